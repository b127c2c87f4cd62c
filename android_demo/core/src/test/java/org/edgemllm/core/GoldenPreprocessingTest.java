package org.edgemllm.core;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import org.junit.Test;

/** Java's preprocessing gives what edge-mllm's Python preprocessing gives, for every golden image. */
public class GoldenPreprocessingTest {
    @Test
    @SuppressWarnings("unchecked")
    public void everyGoldenImageMatchesPython() throws Exception {
        Path dir = Golden.dir("edgemllm.golden");
        List<Object> cases = (List<Object>) Golden.json(dir.resolve("images.json"));
        assertTrue("no golden images", cases.size() >= 10);
        for (Object item : cases) {
            Map<String, Object> c = (Map<String, Object>) item;
            String name = (String) c.get("name");
            ImagePreprocessor processor = new ImagePreprocessor(ImageSpec.fromManifest((Map<String, Object>) c.get("spec")));
            int width = ((Long) c.get("width")).intValue();
            int height = ((Long) c.get("height")).intValue();
            int[] argb = Golden.argbFromRgba(dir.resolve((String) c.get("pixels")));

            int[] rgb = processor.rgbPlanes(argb, width, height);
            int[] expectedRgb = Golden.unsignedBytes(dir.resolve((String) c.get("rgb")));
            assertEquals(name + ": size", expectedRgb.length, rgb.length);
            assertArrayEquals(name + ": uint8 RGB differs from Python's", expectedRgb, rgb);

            assertClose(name + ": normalized", Golden.floats(dir.resolve((String) c.get("normalized"))),
                    processor.normalizedPlanes(argb, width, height));
            assertClose(name + ": rgb float", Golden.floats(dir.resolve((String) c.get("rgb_float"))),
                    processor.rgbFloatPlanes(argb, width, height));
        }
    }

    private static void assertClose(String what, float[] expected, float[] actual) {
        assertEquals(what + ": size", expected.length, actual.length);
        float worst = 0;
        for (int i = 0; i < expected.length; i++) {
            worst = Math.max(worst, Math.abs(expected[i] - actual[i]));
        }
        assertTrue(what + ": max abs diff " + worst + " > 1e-5", worst <= 1e-5f);
    }
}
