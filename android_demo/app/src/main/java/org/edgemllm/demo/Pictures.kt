package org.edgemllm.demo

import android.content.ContentResolver
import android.graphics.Bitmap
import android.graphics.ImageDecoder
import android.net.Uri
import org.edgemllm.core.BundleException
import org.edgemllm.core.ImagePreprocessor
import org.edgemllm.core.ImageSpec
import kotlin.math.max

/** Pictures from the gallery or camera → what the bundle's vision graph reads. */
object Pictures {
    /** Photos are decoded at most this large (longest side); the model sees a few hundred pixels. */
    private const val MAX_SIDE = 2048

    /** Decodes a picture (EXIF rotation applied) as a software ARGB_8888 bitmap. */
    fun decode(resolver: ContentResolver, uri: Uri): Bitmap = try {
        ImageDecoder.decodeBitmap(ImageDecoder.createSource(resolver, uri)) { decoder, info, _ ->
            decoder.allocator = ImageDecoder.ALLOCATOR_SOFTWARE // getPixels needs a software bitmap
            val longest = max(info.size.width, info.size.height)
            if (longest > MAX_SIDE) decoder.setTargetSampleSize((longest + MAX_SIDE - 1) / MAX_SIDE)
        }.copy(Bitmap.Config.ARGB_8888, false)
    } catch (e: Exception) {
        throw BundleException("cannot read that picture: ${e.message ?: e.javaClass.simpleName}", e)
    }

    /** The bitmap preprocessed exactly as edge-mllm's Python preprocessing does (android_demo/core). */
    fun prepare(bitmap: Bitmap, spec: ImageSpec): PreparedImage {
        val pixels = IntArray(bitmap.width * bitmap.height)
        bitmap.getPixels(pixels, 0, bitmap.width, 0, 0, bitmap.width, bitmap.height) // non-premultiplied ARGB
        val processor = ImagePreprocessor(spec)
        return if (spec.visionInput == ImageSpec.VisionInput.RGB_UINT8) {
            PreparedImage(spec.imageSize, processor.rgbPlanes(pixels, bitmap.width, bitmap.height), null)
        } else {
            PreparedImage(spec.imageSize, null, processor.floatInput(pixels, bitmap.width, bitmap.height))
        }
    }
}
