package org.edgemllm.core;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;

/**
 * A bundle's {@code prompt_template}: the chat template's text around one user turn. The prompt for a
 * question about N images is {@code prefix + image × N + question + suffix}, the same text
 * {@code edge-mllm run} gives the model; {@code <image>} marks where each image's embeddings go.
 */
public final class PromptTemplate {
    public static final String IMAGE_MARKER = "<image>";

    public final String prefix;
    public final String image;
    public final String suffix;

    public PromptTemplate(String prefix, String image, String suffix) {
        this.prefix = prefix;
        this.image = image;
        this.suffix = suffix;
    }

    static PromptTemplate fromManifest(Map<String, Object> spec) throws BundleException {
        String image = Bundle.requireString(spec, "image", "prompt_template.");
        if (!image.contains(IMAGE_MARKER)) {
            throw new BundleException("prompt_template.image must contain " + IMAGE_MARKER);
        }
        return new PromptTemplate(Bundle.requireString(spec, "prefix", "prompt_template."), image,
                Bundle.requireString(spec, "suffix", "prompt_template."));
    }

    /** The whole prompt text, with one {@code <image>} per image. */
    public String render(String question, int numImages) throws BundleException {
        if (question.contains(IMAGE_MARKER)) {
            throw new BundleException("the question contains " + IMAGE_MARKER + ": images are placed for you");
        }
        if (numImages < 0) {
            throw new IllegalArgumentException("numImages must be >= 0");
        }
        StringBuilder out = new StringBuilder(prefix);
        for (int i = 0; i < numImages; i++) {
            out.append(image);
        }
        return out.append(question).append(suffix).toString();
    }

    /** One piece of a prompt: text to tokenize, or the place of the next image. */
    public static final class Segment {
        public final String text;  // null for an image

        private Segment(String text) {
            this.text = text;
        }

        public boolean isImage() {
            return text == null;
        }

        @Override
        public String toString() {
            return isImage() ? IMAGE_MARKER : text;
        }
    }

    /**
     * The prompt split at its images, in order, empty texts left out: what a runtime that prefills
     * text and images in turn (ExecuTorch's {@code prefillPrompt} / {@code prefillImages}) is fed.
     */
    public List<Segment> segments(String question, int numImages) throws BundleException {
        String[] texts = render(question, numImages).split(IMAGE_MARKER, -1);
        List<Segment> out = new ArrayList<>();
        for (int i = 0; i < texts.length; i++) {
            if (i > 0) {
                out.add(new Segment(null));
            }
            if (!texts[i].isEmpty()) {
                out.add(new Segment(texts[i]));
            }
        }
        return Collections.unmodifiableList(out);
    }
}
