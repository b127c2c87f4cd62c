package org.edgemllm.core;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import org.junit.Test;

/** Properties that hold for any image; exact values against Python are in GoldenPreprocessingTest. */
public class ImagePreprocessorTest {
    private static final double[] HALF = {0.5, 0.5, 0.5};
    private final ImagePreprocessor pad = new ImagePreprocessor(
            new ImageSpec(8, "pad", new double[] {0.48145466, 0.4578275, 0.40821073}, HALF, ImageSpec.VisionInput.RGB_UINT8));
    private final ImagePreprocessor crop = new ImagePreprocessor(
            new ImageSpec(8, "crop", HALF, HALF, ImageSpec.VisionInput.NORMALIZED_FLOAT32));

    private static int[] solid(int argb, int n) {
        int[] out = new int[n];
        java.util.Arrays.fill(out, argb);
        return out;
    }

    @Test
    public void solidColourStaysThatColourAtAnySize() throws Exception {
        for (int[] wh : new int[][] {{1, 1}, {8, 8}, {3, 50}, {300, 7}, {1000, 999}}) {
            int[] rgb = crop.rgbPlanes(solid(0xff102030, wh[0] * wh[1]), wh[0], wh[1]);
            assertEquals(3 * 64, rgb.length);
            for (int i = 0; i < 64; i++) {
                assertEquals(0x10, rgb[i]);
                assertEquals(0x20, rgb[64 + i]);
                assertEquals(0x30, rgb[128 + i]);
            }
        }
    }

    @Test
    public void padFillsWithTheMeanColour() throws Exception {
        // a 8x2 black strip padded to 8x8: rows 0-2 and 5-7 are the mean colour int(mean * 255)
        int[] rgb = pad.rgbPlanes(solid(0xff000000, 16), 8, 2);
        assertArrayEquals(new int[] {122, 116, 104}, pad.spec().fillColor());
        assertEquals(122, rgb[0]);
        assertEquals(116, rgb[64]);
        assertEquals(104, rgb[128 + 63]);
        assertEquals(0, rgb[3 * 8 + 4]);  // row 3 is the strip
    }

    @Test
    public void transparencyIsWhite() throws Exception {
        int[] rgb = crop.rgbPlanes(solid(0x00123456, 4), 2, 2);
        for (int v : rgb) {
            assertEquals(255, v);
        }
        float[] normalized = crop.floatInput(solid(0x00123456, 4), 2, 2);
        assertEquals((1f - 0.5f) / 0.5f, normalized[0], 0f);
    }

    @Test
    public void badInputsGiveClearErrors() {
        assertTrue(assertThrows(BundleException.class, () -> crop.rgbPlanes(new int[0], 0, 5)).getMessage().contains("no pixels"));
        assertTrue(assertThrows(BundleException.class, () -> crop.rgbPlanes(new int[3], 2, 2)).getMessage().contains("pixel buffer"));
        assertTrue(assertThrows(BundleException.class, () -> crop.rgbPlanes(new int[1], 100_000, 100_000)).getMessage().contains("too large"));
        assertThrows(IllegalStateException.class, () -> pad.floatInput(new int[1], 1, 1));
    }
}
