package org.edgemllm.core;

/**
 * Turns a picture into exactly what a bundle's vision encoder reads, bit for bit what edge-mllm's
 * Python preprocessing ({@code edge_mllm.preprocess.ImageProcessor}) gives: transparency over white,
 * pad to square with the mean colour ("pad"), shortest side to S with Pillow's bicubic filter, centered
 * S×S crop, then rescale / normalise as the bundle's {@code vision_input} says. Outputs are planar
 * (CHW), what {@code LlmModule.prefillImages} and the vision graphs take.
 *
 * <p>Input pixels are {@code int} ARGB, non-premultiplied, row-major: what Android's
 * {@code Bitmap.getPixels} returns.
 */
public final class ImagePreprocessor {
    /** Larger inputs are refused rather than risking running out of memory: downsample when decoding. */
    public static final long MAX_PIXELS = 64L * 1024 * 1024;

    private final ImageSpec spec;

    public ImagePreprocessor(ImageSpec spec) {
        this.spec = spec;
    }

    public ImageSpec spec() {
        return spec;
    }

    /** The picture resized, padded and cropped: uint8 RGB values 0–255 as ints, planar [3, S, S]. */
    public int[] rgbPlanes(int[] argb, int width, int height) throws BundleException {
        byte[] rgb = squareRgb(argb, width, height);
        int s = spec.imageSize;
        int plane = s * s;
        int[] out = new int[3 * plane];
        for (int i = 0; i < plane; i++) {
            for (int c = 0; c < 3; c++) {
                out[c * plane + i] = rgb[3 * i + c] & 0xff;
            }
        }
        return out;
    }

    /** {@code (x / 255 − mean) / std} in float32, planar [3, S, S] (the reference encoder's input). */
    public float[] normalizedPlanes(int[] argb, int width, int height) throws BundleException {
        return floatPlanes(rgbPlanes(argb, width, height), true);
    }

    /** {@code x / 255} in float32, planar [3, S, S]. */
    public float[] rgbFloatPlanes(int[] argb, int width, int height) throws BundleException {
        return floatPlanes(rgbPlanes(argb, width, height), false);
    }

    /**
     * The vision graph's input as floats, for bundles whose {@code vision_input} is a float kind; for
     * {@code rgb_uint8} use {@link #rgbPlanes}.
     */
    public float[] floatInput(int[] argb, int width, int height) throws BundleException {
        switch (spec.visionInput) {
            case NORMALIZED_FLOAT32:
                return normalizedPlanes(argb, width, height);
            case RGB_FLOAT32:
                return rgbFloatPlanes(argb, width, height);
            default:
                throw new IllegalStateException("this bundle's vision graph reads uint8 RGB: use rgbPlanes");
        }
    }

    private float[] floatPlanes(int[] planes, boolean normalize) {
        // float32 throughout, the same operations in the same order as the Python code, so results are equal
        float inv255 = (float) (1.0 / 255.0);
        int plane = spec.imageSize * spec.imageSize;
        float[] out = new float[planes.length];
        for (int c = 0; c < 3; c++) {
            float mean = (float) spec.imageMean[c];
            float std = (float) spec.imageStd[c];
            for (int i = c * plane; i < (c + 1) * plane; i++) {
                float x = planes[i] * inv255;
                out[i] = normalize ? (x - mean) / std : x;
            }
        }
        return out;
    }

    /** Interleaved RGB bytes of the S×S picture. */
    private byte[] squareRgb(int[] argb, int width, int height) throws BundleException {
        if (width < 1 || height < 1) {
            throw new BundleException("the image has no pixels (" + width + "x" + height + ")");
        }
        if ((long) width * height > MAX_PIXELS) {
            throw new BundleException("the image is too large (" + width + "x" + height + "): decode it downsampled");
        }
        if (argb.length < width * height) {
            throw new BundleException("the pixel buffer holds " + argb.length + " pixels, not " + width + "x" + height);
        }
        RgbImage image = RgbImage.overWhite(argb, width, height);
        if (spec.aspectRatio.equals("pad")) {
            image = image.expandToSquare(spec.fillColor());
        }
        return resizeAndCrop(image).rgb;
    }

    /** Shortest side to S (bicubic), then a centered S×S crop. */
    private RgbImage resizeAndCrop(RgbImage image) {
        int s = spec.imageSize;
        int w = image.width;
        int h = image.height;
        int shortSide = Math.min(w, h);
        int longSide = Math.max(w, h);
        int newLong = (int) ((double) ((long) s * longSide) / shortSide);  // Python's int(s * long / short)
        int newW = w <= h ? s : newLong;
        int newH = w <= h ? newLong : s;
        RgbImage resized = PillowResize.bicubic(image, newW, newH);
        return resized.crop((newW - s) / 2, (newH - s) / 2, s, s);
    }

    /** Interleaved 8-bit RGB, row-major. */
    static final class RgbImage {
        final int width;
        final int height;
        final byte[] rgb;

        RgbImage(int width, int height, byte[] rgb) {
            this.width = width;
            this.height = height;
            this.rgb = rgb;
        }

        /**
         * ARGB → RGB, transparent pixels composited over opaque white with Pillow's integer
         * {@code alpha_composite} (what the Python side does for images with alpha); opaque pixels are
         * unchanged by it.
         */
        static RgbImage overWhite(int[] argb, int width, int height) {
            byte[] rgb = new byte[3 * width * height];
            for (int i = 0; i < width * height; i++) {
                int p = argb[i];
                int a = p >>> 24;
                for (int c = 0; c < 3; c++) {
                    int v = (p >>> (16 - 8 * c)) & 0xff;
                    rgb[3 * i + c] = (byte) (a == 255 ? v : overWhite(v, a));
                }
            }
            return new RgbImage(width, height, rgb);
        }

        private static int overWhite(int v, int alpha) {
            if (alpha == 0) {
                return 255;
            }
            // Pillow's AlphaComposite.c with an opaque white destination: 7 extra bits, rounded /255
            final int bits = 7;
            int outA255 = alpha * 255 + 255 * (255 - alpha);
            int coef1 = alpha * 255 * 255 * (1 << bits) / outA255;
            int coef2 = 255 * (1 << bits) - coef1;
            int tmp = v * coef1 + 255 * coef2 + (0x80 << bits);
            return ((((tmp >>> 8) + tmp) >>> 8)) >>> bits;
        }

        /** LLaVA's {@code expand2square}: the short side padded symmetrically (extra pixel after). */
        RgbImage expandToSquare(int[] fill) {
            if (width == height) {
                return this;
            }
            int side = Math.max(width, height);
            byte[] out = new byte[3 * side * side];
            for (int i = 0; i < side * side; i++) {
                out[3 * i] = (byte) fill[0];
                out[3 * i + 1] = (byte) fill[1];
                out[3 * i + 2] = (byte) fill[2];
            }
            int left = (side - width) / 2;
            int top = (side - height) / 2;
            for (int y = 0; y < height; y++) {
                System.arraycopy(rgb, 3 * y * width, out, 3 * ((top + y) * side + left), 3 * width);
            }
            return new RgbImage(side, side, out);
        }

        RgbImage crop(int left, int top, int w, int h) {
            if (left == 0 && top == 0 && w == width && h == height) {
                return this;
            }
            byte[] out = new byte[3 * w * h];
            for (int y = 0; y < h; y++) {
                System.arraycopy(rgb, 3 * ((top + y) * width + left), out, 3 * y * w, 3 * w);
            }
            return new RgbImage(w, h, out);
        }
    }
}
