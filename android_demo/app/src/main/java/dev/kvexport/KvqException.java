package dev.kvexport;

/** A failure of the native runner (bad bundle, missing kernel, context full, ...): the message names the fix. */
public class KvqException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    public KvqException(String message) {
        super(message);
    }
}
