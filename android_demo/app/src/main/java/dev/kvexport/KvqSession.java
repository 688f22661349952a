package dev.kvexport;

/**
 * One loaded bundle: open, generate (streaming, stoppable), read stats, close. Errors are
 * {@link KvqException}s with the native message. Methods are synchronized, so one session is
 * used by one thread at a time; live numbers during a run come from calling {@link #stats()}
 * inside the listener (same thread, the lock is reentrant).
 */
public final class KvqSession implements AutoCloseable {
    private long handle;

    /**
     * @param bundleDir   a folder holding manifest.json, model.pte and tokenizer.json
     * @param kernelsPath libkvq_executorch.so to load, or "" when the kernels are linked in (the app)
     * @param threads     ExecuTorch thread pool size, 0 for the runtime's default
     */
    public KvqSession(String bundleDir, String kernelsPath, int threads) {
        handle = KvqNative.open(bundleDir, kernelsPath == null ? "" : kernelsPath, threads);
    }

    public synchronized String manifestJson() {
        return KvqNative.manifestJson(live());
    }

    /** Model, policy and budget, weights, context: a few lines for the screen. */
    public synchronized String summary() {
        return KvqNative.summary(live());
    }

    public synchronized int[] encode(String text) {
        return KvqNative.encode(live(), text);
    }

    public synchronized String decode(int[] ids) {
        return KvqNative.decode(live(), ids);
    }

    /** Greedy when temperature is 0. Restarts from an empty cache: pass the whole conversation. */
    public synchronized int[] generate(int[] promptIds, int maxNewTokens, float temperature, long seed, TokenListener listener) {
        return KvqNative.generate(live(), promptIds, maxNewTokens, temperature, seed, listener);
    }

    public int[] generate(String prompt, int maxNewTokens, float temperature, long seed, TokenListener listener) {
        return generate(encode(prompt), maxNewTokens, temperature, seed, listener);
    }

    public synchronized KvqStats stats() {
        return KvqStats.fromNative(KvqNative.stats(live()));
    }

    /** SmolLM2's chat format (the bundle's chat template, one user turn), ready for encode. */
    public static String chatPrompt(String system, String user) {
        StringBuilder s = new StringBuilder();
        if (system != null && !system.isEmpty()) s.append("<|im_start|>system\n").append(system).append("<|im_end|>\n");
        return s.append("<|im_start|>user\n").append(user).append("<|im_end|>\n<|im_start|>assistant\n").toString();
    }

    @Override
    public synchronized void close() {
        KvqNative.close(handle);
        handle = 0;
    }

    private long live() {
        if (handle == 0) throw new IllegalStateException("the session is closed");
        return handle;
    }
}
