package dev.kvexport;

/**
 * The JNI surface of libkvq_jni.so (app/src/main/cpp/kvq_jni.cpp). Plain Java so the host test
 * compiles this very file; use {@link KvqSession}, which owns the handle.
 */
final class KvqNative {
    static {
        System.loadLibrary("kvq_jni");  // the APK's lib/arm64-v8a, or -Djava.library.path on the host
    }

    private KvqNative() {}

    /** Loads a bundle folder; kernelsPath "" when the kvq kernels are linked in (Android). */
    static native long open(String bundleDir, String kernelsPath, int threads);

    static native void close(long handle);

    static native String manifestJson(long handle);

    static native String summary(long handle);

    static native int[] encode(long handle, String text);

    static native String decode(long handle, int[] ids);

    static native int[] generate(long handle, int[] promptIds, int maxNewTokens, float temperature, long seed,
                                 TokenListener listener);

    /** See KvqStats.fromNative for the layout. */
    static native double[] stats(long handle);
}
