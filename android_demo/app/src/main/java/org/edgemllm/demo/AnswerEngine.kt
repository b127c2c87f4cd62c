package org.edgemllm.demo

import org.edgemllm.core.Bundle
import org.edgemllm.core.BundleException
import org.edgemllm.core.PromptTemplate

/** A picture ready for the bundle's vision graph: planar [3, S, S], uint8 values as ints or floats. */
class PreparedImage(val size: Int, val bytes: IntArray?, val floats: FloatArray?)

/** Receives the answer as it is generated (called on the engine's thread). */
interface AnswerListener {
    /** The image is encoded and in the KV cache. */
    fun onImageDone()

    /** The next piece of text of the answer. */
    fun onText(text: String)
}

/** One runtime that runs a bundle: the app talks to ExecuTorch (and later llama.cpp) only through this. */
interface AnswerEngine : AutoCloseable {
    /** Answers the prompt (texts and images in turn) greedily; returns when generation ends. */
    fun answer(prompt: List<PromptTemplate.Segment>, images: List<PreparedImage>, maxNewTokens: Int, listener: AnswerListener)

    /** Ends a running [answer] early (from any thread). */
    fun stop()

    companion object {
        /** The engine for the bundle's format, loaded. */
        fun open(bundle: Bundle): AnswerEngine = when (bundle.engine()) {
            Bundle.Engine.EXECUTORCH -> ExecuTorchEngine(bundle)
            Bundle.Engine.LLAMA_CPP -> throw BundleException(
                "GGUF bundles run in llama.cpp, which this app version does not bundle yet: " +
                    "export with --format executorch, or use llama.cpp's llama-mtmd-cli on the phone")
            null -> throw BundleException("the bundle names no engine")
        }
    }
}
