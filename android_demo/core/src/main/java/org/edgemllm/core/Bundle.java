package org.edgemllm.core;

import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;

/**
 * An exported edge-mllm bundle (a folder with {@code manifest.json}), read and checked the way the
 * app needs it: which engine runs it, which files it loads, how images and prompts are prepared.
 *
 * <p>{@link #open} checks the manifest and that every listed file is there at its listed size
 * (fast); {@link #verifyChecksums} also hashes every file (seconds for a few hundred MB on a phone).
 */
public final class Bundle {
    public static final String MANIFEST = "manifest.json";

    /** The on-device runtime that loads a bundle. */
    public enum Engine {
        /** {@code org.pytorch:executorch-android}'s multimodal {@code LlmModule}. */
        EXECUTORCH,
        /** llama.cpp with its multimodal library (libmtmd). */
        LLAMA_CPP
    }

    /** One file the manifest lists. */
    public static final class FileEntry {
        public final String path;
        public final long size;
        public final String sha256;

        FileEntry(String path, long size, String sha256) {
            this.path = path;
            this.size = size;
            this.sha256 = sha256;
        }
    }

    private final Path dir;
    private final Map<String, Object> manifest;
    private final String format;
    private final Engine engine;
    private final List<FileEntry> files;
    private final Path modelFile;
    private final Path visionFile;
    private final Path tokenizerFile;
    private final ImageSpec imageSpec;
    private final PromptTemplate promptTemplate;
    private final int imageTokenCount;
    private final int maxSeqLen;
    private final List<Integer> stopTokenIds;

    private Bundle(Path dir, Map<String, Object> manifest) throws BundleException {
        this.dir = dir;
        this.manifest = manifest;
        format = requireString(manifest, "format", "");
        engine = engineFor(format);
        files = fileEntries(manifest);
        Map<String, Object> formatInfo = section(manifest, format.startsWith("executorch") ? "executorch" : format);
        if (engine == Engine.EXECUTORCH) {
            modelFile = listedFile(requireString(formatInfo, "program", format + "."));
            visionFile = null;
        } else {
            modelFile = listedFile(requireString(formatInfo, "model_file", format + "."));
            Object mmproj = formatInfo.get("mmproj_file");
            visionFile = mmproj == null ? null : listedFile(requireString(formatInfo, "mmproj_file", format + "."));
        }
        tokenizerFile = listedFile(requireString(manifest, "tokenizer", ""));
        Object preprocessing = manifest.get("image_preprocessing");
        imageSpec = preprocessing == null ? null : ImageSpec.fromManifest(asObject(preprocessing, "image_preprocessing"));
        Object prompt = manifest.get("prompt_template");
        promptTemplate = prompt == null ? null : PromptTemplate.fromManifest(asObject(prompt, "prompt_template"));
        imageTokenCount = (int) requireLong(manifest, "image_token_count");
        long contextLength = requireLong(manifest, "max_seq_len");
        if (formatInfo.get("max_seq_len") instanceof Long) {  // ExecuTorch's KV cache may be shorter
            contextLength = Math.min(contextLength, (Long) formatInfo.get("max_seq_len"));
        }
        maxSeqLen = (int) contextLength;
        stopTokenIds = stopTokens(section(manifest, "special_tokens"));
    }

    /**
     * Reads {@code dir/manifest.json} and checks that the bundle is one this app runs and that every
     * listed file is present at its listed size.
     */
    public static Bundle open(Path dir) throws BundleException {
        if (!Files.isDirectory(dir)) {
            throw new BundleException("bundle folder not found: " + dir);
        }
        String text;
        try {
            text = new String(Files.readAllBytes(dir.resolve(MANIFEST)), StandardCharsets.UTF_8);
        } catch (NoSuchFileException e) {
            throw new BundleException(dir + " is not an edge-mllm bundle: " + MANIFEST
                    + " is missing (make one with `edge-mllm export`)");
        } catch (IOException e) {
            throw new BundleException("cannot read " + dir.resolve(MANIFEST) + ": " + e.getMessage(), e);
        }
        Object parsed;
        try {
            parsed = Json.parse(text);
        } catch (BundleException e) {
            throw new BundleException(MANIFEST + " of " + dir + " is corrupt: " + e.getMessage(), e);
        }
        Bundle bundle = new Bundle(dir, asObject(parsed, MANIFEST));
        bundle.checkSizes();
        return bundle;
    }

    /** {@link #open}, then {@link #verifyChecksums}. */
    public static Bundle openVerified(Path dir) throws BundleException {
        Bundle bundle = open(dir);
        bundle.verifyChecksums();
        return bundle;
    }

    private void checkSizes() throws BundleException {
        for (FileEntry entry : files) {
            Path path = dir.resolve(entry.path);
            long size;
            try {
                size = Files.size(path);
            } catch (IOException e) {
                throw new BundleException("bundle file missing: " + entry.path + " (listed in " + MANIFEST
                        + "); copy the whole bundle folder again");
            }
            if (size != entry.size) {
                throw new BundleException("bundle file " + entry.path + " is " + size + " bytes but " + MANIFEST
                        + " says " + entry.size + ": truncated or replaced; copy the bundle again");
            }
        }
    }

    /** Hashes every listed file and compares with the manifest's sha256. */
    public void verifyChecksums() throws BundleException {
        for (FileEntry entry : files) {
            String actual = sha256(dir.resolve(entry.path));
            if (!actual.equals(entry.sha256)) {
                throw new BundleException("bundle file " + entry.path + " is corrupt: its sha256 is " + actual
                        + ", " + MANIFEST + " says " + entry.sha256 + "; copy the bundle again");
            }
        }
    }

    /** Lowercase hex SHA-256 of a file. */
    public static String sha256(Path path) throws BundleException {
        MessageDigest digest;
        try {
            digest = MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
        byte[] buffer = new byte[1 << 20];
        try (InputStream in = Files.newInputStream(path)) {
            for (int n = in.read(buffer); n >= 0; n = in.read(buffer)) {
                digest.update(buffer, 0, n);
            }
        } catch (IOException e) {
            throw new BundleException("cannot read bundle file " + path + ": " + e.getMessage(), e);
        }
        StringBuilder hex = new StringBuilder();
        for (byte b : digest.digest()) {
            hex.append(String.format("%02x", b & 0xff));
        }
        return hex.toString();
    }

    private static Engine engineFor(String format) throws BundleException {
        if (format.equals("executorch") || format.startsWith("executorch-")) {
            return Engine.EXECUTORCH;
        }
        if (format.equals("gguf")) {
            return Engine.LLAMA_CPP;
        }
        if (format.equals("onnx")) {
            throw new BundleException("onnx bundles run in ONNX Runtime, not in this app: export with "
                    + "--format executorch (or gguf)");
        }
        throw new BundleException("unknown bundle format '" + format + "': this app runs executorch and gguf bundles");
    }

    private static List<FileEntry> fileEntries(Map<String, Object> manifest) throws BundleException {
        Object raw = manifest.get("files");
        if (!(raw instanceof List)) {
            throw new BundleException(MANIFEST + " has no \"files\" list");
        }
        List<FileEntry> out = new ArrayList<>();
        for (Object item : (List<?>) raw) {
            Map<String, Object> entry = asObject(item, "files[]");
            String path = requireString(entry, "path", "files[].");
            if (path.isEmpty() || path.startsWith("/") || path.startsWith("\\")
                    || java.util.Arrays.asList(path.split("[/\\\\]")).contains("..")) {
                throw new BundleException(MANIFEST + " lists an unsafe file path: " + path);
            }
            out.add(new FileEntry(path, requireLong(entry, "size"), requireString(entry, "sha256", "files[].")));
        }
        return Collections.unmodifiableList(out);
    }

    private Path listedFile(String path) throws BundleException {
        for (FileEntry entry : files) {
            if (entry.path.equals(path)) {
                return dir.resolve(path);
            }
        }
        throw new BundleException(MANIFEST + " names " + path + " but does not list it among the bundle's files");
    }

    private static List<Integer> stopTokens(Map<String, Object> special) throws BundleException {
        List<Integer> out = new ArrayList<>();
        Object stop = special.get("stop");
        if (stop instanceof List) {
            for (Object id : (List<?>) stop) {
                if (!(id instanceof Long)) {
                    throw new BundleException(MANIFEST + ": special_tokens.stop must hold token ids");
                }
                out.add(((Long) id).intValue());
            }
        }
        return Collections.unmodifiableList(out);
    }

    // ---------------------------------------------------------------------------------------------
    // typed access to manifest fields, with one-line errors

    @SuppressWarnings("unchecked")
    static Map<String, Object> asObject(Object value, String what) throws BundleException {
        if (!(value instanceof Map)) {
            throw new BundleException(MANIFEST + ": " + what + " must be a JSON object");
        }
        return (Map<String, Object>) value;
    }

    static Map<String, Object> section(Map<String, Object> parent, String key) throws BundleException {
        Object value = parent.get(key);
        if (value == null) {
            throw new BundleException(MANIFEST + " has no \"" + key + "\" section");
        }
        return asObject(value, key);
    }

    static String requireString(Map<String, Object> map, String key, String where) throws BundleException {
        Object value = map.get(key);
        if (!(value instanceof String)) {
            throw new BundleException(MANIFEST + ": " + where + key + " is missing or not a string");
        }
        return (String) value;
    }

    static long requireLong(Map<String, Object> map, String key) throws BundleException {
        Object value = map.get(key);
        if (!(value instanceof Long)) {
            throw new BundleException(MANIFEST + ": " + key + " is missing or not an integer");
        }
        return (Long) value;
    }

    // ---------------------------------------------------------------------------------------------

    public Path dir() {
        return dir;
    }

    /** The manifest's {@code format}: "executorch", "executorch-vulkan", …, or "gguf". */
    public String format() {
        return format;
    }

    public Engine engine() {
        return engine;
    }

    /** The program ({@code .pte}) or language-model GGUF. */
    public Path modelFile() {
        return modelFile;
    }

    /** llama.cpp's vision projector GGUF (mmproj); null for ExecuTorch (one program) or text-only models. */
    public Path visionFile() {
        return visionFile;
    }

    /** {@code tokenizer/tokenizer.json}, what ExecuTorch's {@code LlmModule} loads. */
    public Path tokenizerFile() {
        return tokenizerFile;
    }

    public List<FileEntry> files() {
        return files;
    }

    /** How to turn a picture into the vision encoder's input; null for a text-only model. */
    public ImageSpec imageSpec() {
        return imageSpec;
    }

    public boolean acceptsImages() {
        return imageSpec != null;
    }

    /** The chat prompt around one user turn, or an error for bundles that do not carry one. */
    public PromptTemplate promptTemplate() throws BundleException {
        if (promptTemplate == null) {
            throw new BundleException("this bundle has no prompt_template in " + MANIFEST + " (exported by an older "
                    + "edge-mllm, or its chat template changes the user's text): export it again");
        }
        return promptTemplate;
    }

    public int imageTokenCount() {
        return imageTokenCount;
    }

    /** Context length the program was built for: prompt, image tokens and answer together. */
    public int maxSeqLen() {
        return maxSeqLen;
    }

    public List<Integer> stopTokenIds() {
        return stopTokenIds;
    }

    /** The quantization label ("gptq-w4-g32-min-dq", "q4_k_m", …) or null for floats. */
    public String quantization() {
        Object q = manifest.get("quantization");
        return q instanceof String ? (String) q : null;
    }

    /** The edge-mllm version that exported the bundle. */
    public String exporterVersion() {
        Object v = manifest.get("edge_mllm_version");
        return v instanceof String ? (String) v : "unknown";
    }
}
