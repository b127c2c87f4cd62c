package org.edgemllm.core;

/**
 * Timings of one streamed answer, defined as edge-mllm's Python runtimes report them: time to first
 * token from the request (image encoding included), and decode speed over the tokens after the first.
 * Times are {@code System.nanoTime()} values passed in, so tests can drive it.
 */
public final class StreamStats {
    private long startNanos = -1;
    private long visionDoneNanos = -1;
    private long firstTokenNanos = -1;
    private long lastTokenNanos = -1;
    private int tokens;

    /** The request starts (before the image is preprocessed and encoded). */
    public void start(long nanos) {
        startNanos = nanos;
        visionDoneNanos = firstTokenNanos = lastTokenNanos = -1;
        tokens = 0;
    }

    /** The image is encoded (and prefilled, where the runtime does both in one call). */
    public void visionDone(long nanos) {
        requireStarted();
        visionDoneNanos = nanos;
    }

    /** A generated token (or text piece standing for one) arrived. */
    public void token(long nanos) {
        requireStarted();
        if (tokens == 0) {
            firstTokenNanos = nanos;
        }
        lastTokenNanos = nanos;
        tokens++;
    }

    private void requireStarted() {
        if (startNanos < 0) {
            throw new IllegalStateException("start() was not called");
        }
    }

    public int tokens() {
        return tokens;
    }

    /** Seconds from the request to the first token; NaN before it. */
    public double timeToFirstTokenSeconds() {
        return tokens == 0 ? Double.NaN : (firstTokenNanos - startNanos) / 1e9;
    }

    /** Seconds spent on the image; NaN without one. */
    public double visionSeconds() {
        return visionDoneNanos < 0 ? Double.NaN : (visionDoneNanos - startNanos) / 1e9;
    }

    /** Tokens per second after the first: (tokens − 1) / (last − first); 0 with fewer than two tokens. */
    public double decodeTokensPerSecond() {
        if (tokens < 2 || lastTokenNanos == firstTokenNanos) {
            return 0.0;
        }
        return (tokens - 1) / ((lastTokenNanos - firstTokenNanos) / 1e9);
    }

    /** One line for the screen, e.g. "TTFT 0.42 s · 18.3 tok/s · 25 tokens". */
    public String summary() {
        if (tokens == 0) {
            return "no tokens yet";
        }
        String vision = Double.isNaN(visionSeconds()) ? "" : String.format(java.util.Locale.ROOT, " (image %.2f s)", visionSeconds());
        return String.format(java.util.Locale.ROOT, "TTFT %.2f s%s · %.1f tok/s · %d tokens",
                timeToFirstTokenSeconds(), vision, decodeTokensPerSecond(), tokens);
    }
}
