package dev.kvexport.demo

import android.app.Activity
import android.os.Bundle
import android.view.ViewGroup.LayoutParams.MATCH_PARENT
import android.view.ViewGroup.LayoutParams.WRAP_CONTENT
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.Spinner
import android.widget.TextView
import dev.kvexport.KvqSession
import dev.kvexport.KvqStats
import java.io.File
import java.util.Locale
import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicBoolean

/**
 * One screen: pick a bundle, see its manifest, prompt, stream the reply (stop at any token), live
 * stats. Thin on purpose: everything below the widgets is KvqSession, tested on the host JVM.
 * All native calls run on one worker thread; the UI thread only posts and paints.
 */
class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor()
    private val stop = AtomicBoolean(false)
    private var session: KvqSession? = null  // touched on the worker thread only

    private lateinit var bundles: Spinner
    private lateinit var manifest: TextView
    private lateinit var prompt: EditText
    private lateinit var run: Button
    private lateinit var reply: TextView
    private lateinit var stats: TextView
    private lateinit var bar: KvBarView
    private var generating = false

    override fun onCreate(state: Bundle?) {
        super.onCreate(state)
        val root = LinearLayout(this).apply { orientation = LinearLayout.VERTICAL; setPadding(24, 24, 24, 24) }
        bundles = Spinner(this)
        val load = Button(this).apply { text = "Load"; setOnClickListener { load() } }
        manifest = TextView(this)
        prompt = EditText(this).apply { hint = "Ask something"; setText("What is the capital of France?") }
        run = Button(this).apply { text = "Generate"; setOnClickListener { if (generating) stop.set(true) else generate() } }
        stats = TextView(this)
        bar = KvBarView(this)
        reply = TextView(this).apply { setTextIsSelectable(true) }
        listOf(bundles, load, manifest, prompt, run, stats, bar).forEach { root.addView(it, LinearLayout.LayoutParams(MATCH_PARENT, WRAP_CONTENT)) }
        root.addView(ScrollView(this).apply { addView(reply) }, LinearLayout.LayoutParams(MATCH_PARENT, 0, 1f))
        setContentView(root)
        bundles.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, bundleDirs().map { it.path })
        if (bundles.adapter.isEmpty) manifest.text = "No bundle found: push one with `kvexport android push DIR` (README.md)."
    }

    /** Folders holding a manifest.json: pushed by `kvexport android push`, or by hand to /data/local/tmp. */
    private fun bundleDirs(): List<File> =
        listOfNotNull(getExternalFilesDir(null)?.let { File(it, "bundles") }, File("/data/local/tmp/kvexport/bundles"))
            .flatMap { it.listFiles()?.toList() ?: emptyList() }
            .filter { File(it, "manifest.json").isFile }
            .sortedBy { it.name }

    private fun load() {
        val dir = bundles.selectedItem as? String ?: return
        manifest.text = "loading $dir ..."
        worker.execute {
            val text = try {
                session?.close()
                session = null
                // "": the kvq kernels are linked into libkvq_jni.so (no library to dlopen)
                session = KvqSession(dir, "", Runtime.getRuntime().availableProcessors().coerceAtMost(4))
                session!!.summary()
            } catch (e: RuntimeException) {  // KvqException: bad bundle, missing kernel, ...
                "Cannot load $dir:\n${e.message}"
            }
            runOnUiThread { manifest.text = text }
        }
    }

    private fun generate() {
        val text = prompt.text.toString()
        stop.set(false)
        setGenerating(true)
        reply.text = ""
        worker.execute {
            val s = session
            val error = try {
                checkNotNull(s) { "Load a bundle first." }
                s.generate(KvqSession.chatPrompt("", text), 256, 0f, 0L) { _, piece ->
                    val live = s.stats()  // same thread as generate: the live numbers of this run
                    runOnUiThread { reply.append(piece); showStats(live) }
                    !stop.get()
                }
                null
            } catch (e: RuntimeException) {  // context full, bad input, closed session: shown, never a crash
                e.message
            }
            val last = if (s != null && error == null) s.stats() else null
            runOnUiThread {
                if (last != null) showStats(last)
                if (error != null) reply.append("\n[error] $error")
                setGenerating(false)
            }
        }
    }

    private fun showStats(st: KvqStats) {
        val kv = KvqStats.BITS.indices.joinToString(" ") { "${KvqStats.BITS[it]}b:${st.kvBytes[it] / 1024}K" }
        stats.text = String.format(Locale.ROOT, "prefill %.1f tok/s · decode %.1f tok/s · context %d/%d\nKV %s (of %dK)%s",
            st.prefillTokPerS, st.decodeTokPerS, st.contextUsed, st.contextMax, kv, st.kvBytesAllocated / 1024,
            if (st.stopped.isEmpty()) "" else " · stopped: ${st.stopped}")
        bar.show(st.kvBytes, st.kvBytesAllocated)
    }

    private fun setGenerating(on: Boolean) {
        generating = on
        run.text = if (on) "Stop" else "Generate"
    }

    override fun onDestroy() {
        stop.set(true)
        worker.execute { session?.close(); session = null }
        worker.shutdown()
        super.onDestroy()
    }
}
