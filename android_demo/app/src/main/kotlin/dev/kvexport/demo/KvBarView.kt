package dev.kvexport.demo

import android.content.Context
import android.graphics.Canvas
import android.graphics.Color
import android.graphics.Paint
import android.view.View

/** One horizontal bar: KV bytes at 2/4/8/16 bits as coloured segments of the allocated pools. */
class KvBarView(context: Context) : View(context) {
    private val colors = intArrayOf(Color.rgb(0x2e, 0x7d, 0x32), Color.rgb(0x15, 0x65, 0xc0), Color.rgb(0xef, 0x6c, 0x00), Color.rgb(0xc6, 0x28, 0x28))
    private val paint = Paint(Paint.ANTI_ALIAS_FLAG)
    private var bytes = LongArray(4)
    private var allocated = 1L

    fun show(kvBytes: LongArray, kvBytesAllocated: Long) {
        bytes = kvBytes.copyOf()
        allocated = maxOf(1L, kvBytesAllocated)
        invalidate()
    }

    override fun onMeasure(widthSpec: Int, heightSpec: Int) =
        setMeasuredDimension(MeasureSpec.getSize(widthSpec), (12 * resources.displayMetrics.density).toInt())

    override fun onDraw(canvas: Canvas) {
        paint.color = Color.LTGRAY
        canvas.drawRect(0f, 0f, width.toFloat(), height.toFloat(), paint)
        var x = 0f
        for (i in bytes.indices) {
            val w = width * bytes[i].toFloat() / allocated
            paint.color = colors[i]
            canvas.drawRect(x, 0f, x + w, height.toFloat(), paint)
            x += w
        }
    }
}
