package org.edgemllm.core;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.io.IOException;
import java.io.RandomAccessFile;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.stream.Stream;
import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;

/** Real bundles made by {@code edge-mllm export} open; broken ones give one clear error each. */
public class BundleTest {
    @Rule public TemporaryFolder tmp = new TemporaryFolder();

    private static Path exported(String format) {
        Path bundle = Golden.dir("edgemllm.bundles").resolve(format);
        assertTrue("the Python side exported no " + format + " bundle at " + bundle, Files.isDirectory(bundle));
        return bundle;
    }

    /** A copy of an exported bundle that a test may break. */
    private Path copyOf(String format) throws IOException {
        Path src = exported(format);
        Path dst = tmp.newFolder(format).toPath();
        try (Stream<Path> walk = Files.walk(src)) {
            for (Path p : (Iterable<Path>) walk::iterator) {
                Path target = dst.resolve(src.relativize(p).toString());
                if (Files.isDirectory(p)) {
                    Files.createDirectories(target);
                } else {
                    Files.copy(p, target, StandardCopyOption.REPLACE_EXISTING);
                }
            }
        }
        return dst;
    }

    private static String manifest(Path bundle) throws IOException {
        return new String(Files.readAllBytes(bundle.resolve(Bundle.MANIFEST)), StandardCharsets.UTF_8);
    }

    private static void writeManifest(Path bundle, String text) throws IOException {
        Files.write(bundle.resolve(Bundle.MANIFEST), text.getBytes(StandardCharsets.UTF_8));
    }

    private static String openError(Path bundle) {
        return assertThrows(BundleException.class, () -> Bundle.openVerified(bundle)).getMessage();
    }

    @Test
    public void executorchBundleOpensWithItsFiles() throws Exception {
        Bundle bundle = Bundle.openVerified(exported("executorch"));
        assertEquals(Bundle.Engine.EXECUTORCH, bundle.engine());
        assertEquals("model.pte", bundle.modelFile().getFileName().toString());
        assertTrue(Files.isRegularFile(bundle.modelFile()) && Files.isRegularFile(bundle.tokenizerFile()));
        assertNull(bundle.visionFile());
        ImageSpec spec = bundle.imageSpec();
        assertNotNull(spec);
        assertEquals(ImageSpec.VisionInput.RGB_UINT8, spec.visionInput);  // the fused vision graph reads bytes
        assertTrue(bundle.imageTokenCount() > 0 && bundle.maxSeqLen() > bundle.imageTokenCount());
        assertTrue(bundle.promptTemplate().render("hi", 1).contains(PromptTemplate.IMAGE_MARKER));
        assertTrue(!bundle.stopTokenIds().isEmpty());
    }

    @Test
    public void ggufBundleOpensWithItsProjector() throws Exception {
        Bundle bundle = Bundle.openVerified(exported("gguf"));
        assertEquals(Bundle.Engine.LLAMA_CPP, bundle.engine());
        assertTrue(bundle.modelFile().toString().endsWith(".gguf"));
        assertNotNull(bundle.visionFile());
        assertTrue(Files.isRegularFile(bundle.visionFile()));
        assertEquals(ImageSpec.VisionInput.NORMALIZED_FLOAT32, bundle.imageSpec().visionInput);
    }

    @Test
    public void missingManifestSaysSo() throws Exception {
        Path bundle = copyOf("gguf");
        Files.delete(bundle.resolve(Bundle.MANIFEST));
        assertTrue(openError(bundle).contains("manifest.json is missing"));
        assertTrue(openError(bundle.resolve("no-such-folder")).contains("bundle folder not found"));
    }

    @Test
    public void corruptManifestSaysSo() throws Exception {
        Path bundle = copyOf("gguf");
        String text = manifest(bundle);
        writeManifest(bundle, text.substring(0, text.length() / 2));
        String error = openError(bundle);
        assertTrue(error, error.contains("corrupt") && error.contains("invalid JSON"));
    }

    @Test
    public void missingFileSaysWhich() throws Exception {
        Path bundle = copyOf("executorch");
        Files.delete(bundle.resolve("model.pte"));
        String error = openError(bundle);
        assertTrue(error, error.contains("missing: model.pte"));
    }

    @Test
    public void truncatedFileSaysSo() throws Exception {
        Path bundle = copyOf("executorch");
        try (RandomAccessFile f = new RandomAccessFile(bundle.resolve("model.pte").toFile(), "rw")) {
            f.setLength(f.length() - 100);
        }
        String error = openError(bundle);
        assertTrue(error, error.contains("model.pte") && error.contains("truncated"));
    }

    @Test
    public void wrongChecksumSaysWhichFile() throws Exception {
        Path bundle = copyOf("gguf");
        Path model = Bundle.open(bundle).modelFile();
        try (RandomAccessFile f = new RandomAccessFile(model.toFile(), "rw")) {
            f.seek(f.length() / 2);
            int b = f.read();
            f.seek(f.length() / 2);
            f.write(b ^ 0xff);  // same size, one byte flipped
        }
        Bundle.open(bundle);  // sizes still match: only the checksum finds it
        String error = openError(bundle);
        assertTrue(error, error.contains(model.getFileName().toString()) && error.contains("sha256"));
    }

    @Test
    public void unknownAndUnsupportedFormatsAreRefused() throws Exception {
        Path bundle = copyOf("gguf");
        String text = manifest(bundle);
        writeManifest(bundle, text.replace("\"format\": \"gguf\"", "\"format\": \"tflite\""));
        assertTrue(openError(bundle).contains("unknown bundle format 'tflite'"));
        writeManifest(bundle, text.replace("\"format\": \"gguf\"", "\"format\": \"onnx\""));
        assertTrue(openError(bundle).contains("ONNX Runtime"));
    }

    @Test
    public void unsafePathsAreRefused() throws Exception {
        Path bundle = copyOf("gguf");
        writeManifest(bundle, manifest(bundle).replace("\"path\": \"tokenizer/", "\"path\": \"../tokenizer/"));
        assertTrue(openError(bundle).contains("unsafe file path"));
    }

    @Test
    public void bundleWithoutPromptTemplateExplainsOnUse() throws Exception {
        Path bundle = copyOf("gguf");
        writeManifest(bundle, manifest(bundle).replace("\"prompt_template\": {", "\"old_prompt_template\": {"));
        Bundle opened = Bundle.open(bundle);
        String error = assertThrows(BundleException.class, opened::promptTemplate).getMessage();
        assertTrue(error, error.contains("export it again"));
    }
}
