package org.edgemllm.demo

import org.edgemllm.core.Bundle
import org.edgemllm.core.BundleException
import org.edgemllm.core.PromptTemplate
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * An ExecuTorch bundle (model.pte with the token_embedding / vision_encoder / text_decoder methods)
 * in ExecuTorch's multimodal LlmModule, fed as its LLaVA demo does: the text before the image with
 * prefillPrompt, the image with prefillImages, then generate() on the text after it.
 */
class ExecuTorchEngine(private val bundle: Bundle) : AnswerEngine {
    private val module = LlmModule(
        LlmModule.MODEL_TYPE_TEXT_VISION,
        bundle.modelFile().toString(),
        bundle.tokenizerFile().toString(),
        0.0f, // greedy, as edge-mllm run
    )

    init {
        val status = module.load()
        if (status != 0) {
            throw BundleException("ExecuTorch could not load ${bundle.modelFile().fileName} (error $status): " +
                "is the app's executorch-android built with the bundle's backend (${bundle.format()})?")
        }
    }

    override fun answer(
        prompt: List<PromptTemplate.Segment>,
        images: List<PreparedImage>,
        maxNewTokens: Int,
        listener: AnswerListener,
    ) {
        module.resetContext()
        var nextImage = 0
        // everything but a final text segment is prefilled; generate() runs that last text
        val last = prompt.last()
        val prefill = if (last.isImage) prompt else prompt.dropLast(1)
        for (segment in prefill) {
            if (segment.isImage) {
                val image = images[nextImage++]
                val bytes = image.bytes
                if (bytes != null) {
                    module.prefillImages(bytes, image.size, image.size, 3)
                } else {
                    module.prefillImages(requireNotNull(image.floats), image.size, image.size, 3)
                }
                listener.onImageDone()
            } else {
                module.prefillPrompt(segment.text)
            }
        }
        var generated = 0
        val callback = object : LlmCallback {
            override fun onResult(result: String) {
                listener.onText(result)
                if (++generated >= maxNewTokens) module.stop()
            }

            override fun onStats(stats: String) {}
        }
        module.generate(if (last.isImage) "" else last.text, bundle.maxSeqLen(), callback, false)
    }

    override fun stop() = module.stop()

    override fun close() = module.resetNative()
}
