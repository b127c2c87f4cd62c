package org.edgemllm.core;

import static org.junit.Assume.assumeTrue;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;

/**
 * Where the Python side ({@code tests/test_android_core.py}) put its golden files and bundles: system
 * properties {@code edgemllm.golden} and {@code edgemllm.bundles}. Without them (a plain Gradle run) the
 * cross-language tests are skipped, unless {@code edgemllm.require=true} makes that a failure.
 */
final class Golden {
    private Golden() {}

    static Path dir(String property) {
        String value = System.getProperty(property);
        if (Boolean.getBoolean("edgemllm.require")) {
            if (value == null) {
                throw new AssertionError("system property " + property + " is not set");
            }
        } else {
            assumeTrue(property + " not set: run through pytest tests/test_android_core.py", value != null);
        }
        return Paths.get(value);
    }

    static Object json(Path file) throws IOException, BundleException {
        return Json.parse(new String(Files.readAllBytes(file), StandardCharsets.UTF_8));
    }

    static float[] floats(Path file) throws IOException {
        ByteBuffer buffer = ByteBuffer.wrap(Files.readAllBytes(file)).order(ByteOrder.LITTLE_ENDIAN);
        float[] out = new float[buffer.remaining() / 4];
        buffer.asFloatBuffer().get(out);
        return out;
    }

    static int[] unsignedBytes(Path file) throws IOException {
        byte[] bytes = Files.readAllBytes(file);
        int[] out = new int[bytes.length];
        for (int i = 0; i < bytes.length; i++) {
            out[i] = bytes[i] & 0xff;
        }
        return out;
    }

    /** RGBA bytes (what the Python side wrote) → ARGB ints, as Android's {@code Bitmap.getPixels} gives. */
    static int[] argbFromRgba(Path file) throws IOException {
        byte[] rgba = Files.readAllBytes(file);
        int[] out = new int[rgba.length / 4];
        for (int i = 0; i < out.length; i++) {
            int r = rgba[4 * i] & 0xff;
            int g = rgba[4 * i + 1] & 0xff;
            int b = rgba[4 * i + 2] & 0xff;
            int a = rgba[4 * i + 3] & 0xff;
            out[i] = (a << 24) | (r << 16) | (g << 8) | b;
        }
        return out;
    }
}
