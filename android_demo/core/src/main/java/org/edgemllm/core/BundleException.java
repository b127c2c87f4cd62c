package org.edgemllm.core;

/** A bundle, image or prompt the app cannot use; the message is one line, meant for the user. */
public class BundleException extends Exception {
    private static final long serialVersionUID = 1L;

    public BundleException(String message) {
        super(message);
    }

    public BundleException(String message, Throwable cause) {
        super(message, cause);
    }
}
