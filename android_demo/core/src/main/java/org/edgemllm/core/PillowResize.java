package org.edgemllm.core;

/**
 * Pillow's bicubic resize ({@code Image.resize(..., BICUBIC)} on 8-bit RGB, {@code libImaging/Resample.c}):
 * separable, horizontal pass first into an 8-bit image, then vertical; the filter widened by the scale
 * when shrinking (antialiasing); weights normalised per output pixel and rounded to 22-bit fixed point.
 *
 * <p>Ported by hand because the model was trained and exported on Pillow's pixels and no Android or
 * Java library reproduces them: {@code Bitmap.createScaledBitmap} filters differently and does not
 * antialias, which moves every input pixel the vision encoder sees.
 */
final class PillowResize {
    private static final int PRECISION_BITS = 32 - 8 - 2;
    private static final double SUPPORT = 2.0;  // bicubic

    private PillowResize() {}

    /** Keys' cubic convolution with a = −0.5, as Pillow's {@code bicubic_filter}. */
    private static double bicubic(double x) {
        final double a = -0.5;
        x = Math.abs(x);
        if (x < 1.0) {
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
        }
        if (x < 2.0) {
            return (((x - 5) * x + 8) * x - 4) * a;
        }
        return 0.0;
    }

    /** Per output pixel: the first input pixel, how many are used, and their fixed-point weights. */
    private static final class Coefficients {
        final int taps;
        final int[] first;
        final int[] count;
        final int[] weights;  // [out * taps + k]

        Coefficients(int inSize, int outSize) {
            double scale = (double) inSize / outSize;
            double filterScale = Math.max(scale, 1.0);
            double support = SUPPORT * filterScale;
            taps = (int) Math.ceil(support) * 2 + 1;
            first = new int[outSize];
            count = new int[outSize];
            weights = new int[outSize * taps];
            double[] k = new double[taps];
            double invFilterScale = 1.0 / filterScale;  // multiplied, not divided: Pillow's rounding
            for (int xx = 0; xx < outSize; xx++) {
                double center = (xx + 0.5) * scale;
                int xmin = Math.max((int) (center - support + 0.5), 0);  // (int) truncates, as C's cast
                int xmax = Math.min((int) (center + support + 0.5), inSize) - xmin;
                double sum = 0.0;
                for (int x = 0; x < xmax; x++) {
                    k[x] = bicubic((x + xmin - center + 0.5) * invFilterScale);
                    sum += k[x];
                }
                for (int x = 0; x < xmax; x++) {
                    double w = sum != 0.0 ? k[x] / sum : k[x];
                    weights[xx * taps + x] = (int) (w < 0 ? -0.5 + w * (1 << PRECISION_BITS)
                                                          : 0.5 + w * (1 << PRECISION_BITS));
                }
                first[xx] = xmin;
                count[xx] = xmax;
            }
        }
    }

    private static int clip8(int acc) {
        int v = acc >> PRECISION_BITS;
        return v < 0 ? 0 : Math.min(v, 255);
    }

    static ImagePreprocessor.RgbImage bicubic(ImagePreprocessor.RgbImage in, int outW, int outH) {
        boolean horizontal = outW != in.width;
        boolean vertical = outH != in.height;
        if (!horizontal && !vertical) {
            return in;
        }
        Coefficients kx = new Coefficients(in.width, outW);
        Coefficients ky = new Coefficients(in.height, outH);
        ImagePreprocessor.RgbImage image = in;
        int rowOffset = 0;
        if (horizontal) {
            // only the rows the vertical pass reads
            int firstRow = ky.first[0];
            int lastRow = ky.first[outH - 1] + ky.count[outH - 1];
            image = horizontalPass(in, kx, outW, firstRow, lastRow);
            rowOffset = firstRow;
        }
        return vertical ? verticalPass(image, ky, outH, rowOffset) : image;
    }

    private static ImagePreprocessor.RgbImage horizontalPass(
            ImagePreprocessor.RgbImage in, Coefficients kx, int outW, int firstRow, int lastRow) {
        int rows = lastRow - firstRow;
        byte[] out = new byte[3 * outW * rows];
        byte[] src = in.rgb;
        for (int y = 0; y < rows; y++) {
            int rowStart = 3 * (y + firstRow) * in.width;
            for (int xx = 0; xx < outW; xx++) {
                int r = 1 << (PRECISION_BITS - 1);
                int g = r;
                int b = r;
                int base = xx * kx.taps;
                int x0 = kx.first[xx];
                for (int x = 0; x < kx.count[xx]; x++) {
                    int w = kx.weights[base + x];
                    int p = rowStart + 3 * (x0 + x);
                    r += (src[p] & 0xff) * w;
                    g += (src[p + 1] & 0xff) * w;
                    b += (src[p + 2] & 0xff) * w;
                }
                int o = 3 * (y * outW + xx);
                out[o] = (byte) clip8(r);
                out[o + 1] = (byte) clip8(g);
                out[o + 2] = (byte) clip8(b);
            }
        }
        return new ImagePreprocessor.RgbImage(outW, rows, out);
    }

    private static ImagePreprocessor.RgbImage verticalPass(
            ImagePreprocessor.RgbImage in, Coefficients ky, int outH, int rowOffset) {
        int width = in.width;
        byte[] out = new byte[3 * width * outH];
        byte[] src = in.rgb;
        for (int yy = 0; yy < outH; yy++) {
            int base = yy * ky.taps;
            int y0 = ky.first[yy] - rowOffset;
            for (int x = 0; x < width; x++) {
                int r = 1 << (PRECISION_BITS - 1);
                int g = r;
                int b = r;
                for (int y = 0; y < ky.count[yy]; y++) {
                    int w = ky.weights[base + y];
                    int p = 3 * ((y0 + y) * width + x);
                    r += (src[p] & 0xff) * w;
                    g += (src[p + 1] & 0xff) * w;
                    b += (src[p + 2] & 0xff) * w;
                }
                int o = 3 * (yy * width + x);
                out[o] = (byte) clip8(r);
                out[o + 1] = (byte) clip8(g);
                out[o + 2] = (byte) clip8(b);
            }
        }
        return new ImagePreprocessor.RgbImage(width, outH, out);
    }
}
