package org.edgemllm.core;

import java.util.List;
import java.util.Map;

/** A bundle's {@code image_preprocessing}: what the vision encoder expects of a picture. */
public final class ImageSpec {
    /** The only resize the exporter writes: shortest side bicubic (Pillow's), then a centered crop. */
    public static final String RESIZE = "shortest_side_bicubic_then_center_crop";

    /** What the bundle's vision graph reads, [1, 3, S, S]. */
    public enum VisionInput {
        /** (x / 255 − mean) / std, float32: the reference (unfused) encoder. */
        NORMALIZED_FLOAT32("normalized_float32"),
        /** x / 255, float32: normalisation folded into the graph. */
        RGB_FLOAT32("rgb_float32"),
        /** x itself, 0–255: rescale and normalisation in the graph (ExecuTorch's fused vision). */
        RGB_UINT8("rgb_uint8");

        public final String manifestName;

        VisionInput(String manifestName) {
            this.manifestName = manifestName;
        }

        static VisionInput parse(String name) throws BundleException {
            for (VisionInput v : values()) {
                if (v.manifestName.equals(name)) {
                    return v;
                }
            }
            throw new BundleException("image_preprocessing.vision_input '" + name + "' is unknown to this app");
        }
    }

    public final int imageSize;
    /** "pad": pad to square with the mean colour first (LLaVA / MobileVLM); "crop": center crop only (CLIP). */
    public final String aspectRatio;
    public final double[] imageMean;
    public final double[] imageStd;
    public final VisionInput visionInput;

    public ImageSpec(int imageSize, String aspectRatio, double[] imageMean, double[] imageStd, VisionInput visionInput) {
        this.imageSize = imageSize;
        this.aspectRatio = aspectRatio;
        this.imageMean = imageMean.clone();
        this.imageStd = imageStd.clone();
        this.visionInput = visionInput;
    }

    static ImageSpec fromManifest(Map<String, Object> spec) throws BundleException {
        String resize = Bundle.requireString(spec, "resize", "image_preprocessing.");
        if (!resize.equals(RESIZE)) {
            throw new BundleException("image_preprocessing.resize '" + resize + "' is unknown to this app");
        }
        String aspect = Bundle.requireString(spec, "aspect_ratio", "image_preprocessing.");
        if (!aspect.equals("pad") && !aspect.equals("crop")) {
            throw new BundleException("image_preprocessing.aspect_ratio '" + aspect + "' is unknown to this app");
        }
        long size = Bundle.requireLong(spec, "image_size");
        if (size < 1 || size > 4096) {
            throw new BundleException("image_preprocessing.image_size " + size + " is out of range");
        }
        Object input = spec.get("vision_input");
        VisionInput visionInput = input == null ? VisionInput.NORMALIZED_FLOAT32 : VisionInput.parse(String.valueOf(input));
        return new ImageSpec((int) size, aspect, triple(spec, "image_mean"), triple(spec, "image_std"), visionInput);
    }

    private static double[] triple(Map<String, Object> spec, String key) throws BundleException {
        Object raw = spec.get(key);
        if (!(raw instanceof List) || ((List<?>) raw).size() != 3) {
            throw new BundleException("image_preprocessing." + key + " must be three numbers (R, G, B)");
        }
        double[] out = new double[3];
        for (int c = 0; c < 3; c++) {
            Object v = ((List<?>) raw).get(c);
            if (!(v instanceof Number)) {
                throw new BundleException("image_preprocessing." + key + " must be three numbers (R, G, B)");
            }
            out[c] = ((Number) v).doubleValue();
        }
        if (key.equals("image_std") && (out[0] <= 0 || out[1] <= 0 || out[2] <= 0)) {
            throw new BundleException("image_preprocessing.image_std must be positive");
        }
        return out;
    }

    /** The padding colour: Python's {@code int(mean * 255)} per channel. */
    public int[] fillColor() {
        return new int[] {(int) (imageMean[0] * 255), (int) (imageMean[1] * 255), (int) (imageMean[2] * 255)};
    }
}
