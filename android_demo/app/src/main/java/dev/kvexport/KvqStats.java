package dev.kvexport;

/** The numbers of the last (or running) generation, as the screen shows them. */
public final class KvqStats {
    /** Storage widths of the packed cache, in the order of {@link #kvBytes}. */
    public static final int[] BITS = {2, 4, 8, 16};

    public final int promptTokens, generated, contextUsed, contextMax;
    public final double prefillTokPerS, decodeTokPerS, firstTokenMs;
    public final long[] kvBytes;  // bytes of cached K and V stored at 2, 4, 8, 16 bits (after a run)
    public final long kvBytesAllocated;
    public final String stopped;  // "eos", "max_new_tokens", "listener" or "" while running / before a run

    private KvqStats(double[] v) {
        promptTokens = (int) v[0];
        generated = (int) v[1];
        contextUsed = (int) v[2];
        contextMax = (int) v[3];
        prefillTokPerS = v[4];
        decodeTokPerS = v[5];
        firstTokenMs = v[6];
        kvBytes = new long[] {(long) v[7], (long) v[8], (long) v[9], (long) v[10]};
        kvBytesAllocated = (long) v[11];
        stopped = new String[] {"", "eos", "max_new_tokens", "listener"}[(int) v[12]];
    }

    static KvqStats fromNative(double[] v) {
        return new KvqStats(v);
    }

    public long kvBytesTotal() {
        long t = 0;
        for (long b : kvBytes) t += b;
        return t;
    }

    @Override
    public String toString() {
        return String.format(java.util.Locale.ROOT,
                "prefill %.1f tok/s, decode %.1f tok/s, context %d/%d, KV %d B (2b %d, 4b %d, 8b %d, 16b %d), stopped: %s",
                prefillTokPerS, decodeTokPerS, contextUsed, contextMax, kvBytesTotal(),
                kvBytes[0], kvBytes[1], kvBytes[2], kvBytes[3], stopped);
    }
}
