"""ExecuTorch bundles: one ``model.pte`` that ExecuTorch's LLM runners (``MultimodalRunner``, Android's
``LlmModule``) drive unmodified, built the way ExecuTorch's ``examples/models/llava`` builds LLaVA.

Modules, in pipeline order:
- ``modules``: the source transform (export-ready ``vision_encoder`` / ``token_embedding`` /
  ``text_decoder`` modules; the decoder uses ExecuTorch's ``llama::update_cache`` / ``llama::custom_sdpa``);
- ``quantize``: our integer codes as torchao 8da4w linears and ExecuTorch quantized embeddings, or
  torchao's own quantizer (``8da4w``…);
- ``targets``: the delegate each method is lowered to (XNNPACK, Core ML, Vulkan, QNN, MediaTek);
- ``program``: torch.export → to_edge_transform_and_lower → to_executorch, plus the metadata methods;
- ``bundle``: the registered export formats;
- ``runtime``: run a bundle with ``executorch.runtime`` (or ExecuTorch's ``MultimodalRunner``).
"""
