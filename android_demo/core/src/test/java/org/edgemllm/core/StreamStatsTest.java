package org.edgemllm.core;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import org.junit.Test;

public class StreamStatsTest {
    private static final long MS = 1_000_000L;

    @Test
    public void firstTokenAndDecodeSpeedAsThePythonRuntimes() {
        StreamStats stats = new StreamStats();
        stats.start(1000 * MS);
        stats.visionDone(1200 * MS);
        stats.token(1500 * MS);  // first token: 0.5 s after the request
        for (int i = 1; i <= 20; i++) {
            stats.token(1500 * MS + i * 50 * MS);  // then one every 50 ms
        }
        assertEquals(21, stats.tokens());
        assertEquals(0.5, stats.timeToFirstTokenSeconds(), 1e-9);
        assertEquals(0.2, stats.visionSeconds(), 1e-9);
        assertEquals(20.0, stats.decodeTokensPerSecond(), 1e-9);
        assertEquals("TTFT 0.50 s (image 0.20 s) · 20.0 tok/s · 21 tokens", stats.summary());
    }

    @Test
    public void oneTokenHasNoDecodeSpeedAndRestartClears() {
        StreamStats stats = new StreamStats();
        assertThrows(IllegalStateException.class, () -> stats.token(0));
        stats.start(0);
        assertEquals("no tokens yet", stats.summary());
        stats.token(10 * MS);
        assertEquals(0.0, stats.decodeTokensPerSecond(), 0);
        assertTrue(Double.isNaN(stats.visionSeconds()));
        stats.start(100 * MS);
        assertEquals(0, stats.tokens());
        assertTrue(Double.isNaN(stats.timeToFirstTokenSeconds()));
    }
}
