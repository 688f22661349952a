package dev.kvexport;

/** Streaming callback of {@link KvqSession#generate}; runs on the generating thread. */
public interface TokenListener {
    /**
     * @param id    the generated token id, or -1 for trailing text flushed at the end of a run
     *              (a character cut by the stop or by the last token)
     * @param piece the text this token completes; empty while a multi-byte character is split
     * @return false to stop generating after this token
     */
    boolean onToken(int id, String piece);
}
