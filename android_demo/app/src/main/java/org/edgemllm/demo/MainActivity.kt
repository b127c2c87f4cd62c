package org.edgemllm.demo

import android.graphics.Bitmap
import android.net.Uri
import android.os.Bundle as SavedState
import android.view.View
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import androidx.core.content.FileProvider
import java.io.File
import java.nio.file.Paths
import java.util.concurrent.Executors
import org.edgemllm.core.Bundle
import org.edgemllm.core.BundleException
import org.edgemllm.core.StreamStats
import org.edgemllm.demo.databinding.ActivityMainBinding

/** Pick or take a photo, ask a question, watch the answer stream with its time to first token and speed. */
class MainActivity : AppCompatActivity() {
    private lateinit var ui: ActivityMainBinding
    private val worker = Executors.newSingleThreadExecutor() // the engine is used from this thread only
    private var bundle: Bundle? = null
    private var engine: AnswerEngine? = null
    private var picture: Bitmap? = null
    private var photoUri: Uri? = null

    private val pickPicture = registerForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri ->
        if (uri != null) showPicture(uri)
    }
    private val takePhoto = registerForActivityResult(ActivityResultContracts.TakePicture()) { saved ->
        photoUri?.takeIf { saved }?.let(::showPicture)
    }

    override fun onCreate(savedInstanceState: SavedState?) {
        super.onCreate(savedInstanceState)
        ui = ActivityMainBinding.inflate(layoutInflater)
        setContentView(ui.root)
        ui.bundlePath.setText(File(getExternalFilesDir(null), "bundle").path)
        ui.loadButton.setOnClickListener { loadBundle(ui.bundlePath.text.toString().trim()) }
        ui.pickButton.setOnClickListener {
            pickPicture.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly))
        }
        ui.cameraButton.setOnClickListener {
            val file = File(cacheDir, "photos/photo.jpg").apply { parentFile?.mkdirs() }
            photoUri = FileProvider.getUriForFile(this, "$packageName.photos", file).also(takePhoto::launch)
        }
        ui.askButton.setOnClickListener { ask(ui.question.text.toString()) }
        ui.stopButton.setOnClickListener { engine?.stop() }
    }

    override fun onDestroy() {
        super.onDestroy()
        worker.execute { engine?.close() }
        worker.shutdown()
    }

    private fun loadBundle(path: String) {
        ui.askButton.isEnabled = false
        ui.bundleStatus.text = "Checking $path …"
        worker.execute {
            val message = try {
                engine?.close()
                engine = null
                // sha256 of every file: a bundle half-copied by adb is caught here, not mid-answer
                val opened = Bundle.openVerified(Paths.get(path))
                engine = AnswerEngine.open(opened)
                bundle = opened
                describe(opened)
            } catch (e: BundleException) {
                bundle = null
                "Cannot use this bundle: ${e.message}"
            } catch (e: RuntimeException) { // the runtime's own load errors
                bundle = null
                "The runtime could not load this bundle: ${e.message}"
            }
            runOnUiThread {
                ui.bundleStatus.text = message
                ui.askButton.isEnabled = engine != null
            }
        }
    }

    private fun describe(b: Bundle): String = buildString {
        append("${b.format()} · ${b.quantization() ?: "float"} · context ${b.maxSeqLen()} tokens")
        b.imageSpec()?.let { append(" · images ${it.imageSize}px → ${b.imageTokenCount()} tokens") }
        append(" · exported by edge-mllm ${b.exporterVersion()}")
    }

    private fun showPicture(uri: Uri) {
        worker.execute {
            val result = runCatching { Pictures.decode(contentResolver, uri) }
            runOnUiThread {
                result.onSuccess { picture = it; ui.imageView.setImageBitmap(it) }
                    .onFailure { ui.answer.text = it.message }
            }
        }
    }

    private fun ask(question: String) {
        val b = bundle ?: return
        val running = engine ?: return
        val image = picture
        ui.answer.text = ""
        ui.stats.text = ""
        setRunning(true)
        worker.execute {
            val stats = StreamStats()
            val answer = StringBuilder()
            try {
                stats.start(System.nanoTime())
                val spec = b.imageSpec()
                if (image != null && spec == null) throw BundleException("this model has no vision encoder: it cannot take images")
                val images = if (image != null) listOf(Pictures.prepare(image, spec!!)) else emptyList()
                val prompt = b.promptTemplate().segments(question.trim(), images.size)
                running.answer(prompt, images, MAX_NEW_TOKENS, object : AnswerListener {
                    override fun onImageDone() = stats.visionDone(System.nanoTime())

                    override fun onText(text: String) {
                        stats.token(System.nanoTime())
                        answer.append(text)
                        val shown = answer.toString()
                        val line = stats.summary()
                        runOnUiThread { ui.answer.text = shown; ui.stats.text = line }
                    }
                })
            } catch (e: BundleException) {
                runOnUiThread { ui.answer.text = e.message }
            } catch (e: RuntimeException) {
                runOnUiThread { ui.answer.text = "The runtime failed: ${e.message}" }
            } finally {
                val line = stats.summary()
                runOnUiThread { ui.stats.text = line; setRunning(false) }
            }
        }
    }

    private fun setRunning(running: Boolean) {
        ui.askButton.isEnabled = !running && engine != null
        ui.stopButton.isEnabled = running
        ui.loadButton.isEnabled = !running
        ui.stats.visibility = View.VISIBLE
    }

    private companion object {
        const val MAX_NEW_TOKENS = 256
    }
}
