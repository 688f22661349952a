package dev.kvexport;

import java.io.IOException;
import java.io.RandomAccessFile;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * The app's Java API and JNI bridge on the host JVM (no JUnit: nothing to fetch it from).
 *
 *   java ... dev.kvexport.HostTest CASE --bundle DIR --kernels LIB --prompt 1,2,3 --expect 4,5 --max-new 12
 *       [--text T --text-ids 6,7] [--cycles 100]
 *
 * CASE: tokens | stop | errors | leak. Exit 0 when every check holds; one line per check.
 */
public final class HostTest {
    private final Map<String, String> args;
    private final String bundle, kernels;
    private final int[] prompt, expect;
    private final int maxNew;
    private int passed;

    private HostTest(Map<String, String> args) {
        this.args = args;
        bundle = need("bundle");
        kernels = need("kernels");
        prompt = ids(need("prompt"));
        expect = ids(need("expect"));
        maxNew = Integer.parseInt(need("max-new"));
    }

    public static void main(String[] argv) throws Exception {
        Map<String, String> args = new HashMap<>();
        for (int i = 1; i + 1 < argv.length; i += 2) args.put(argv[i].replaceFirst("^--", ""), argv[i + 1]);
        HostTest t = new HostTest(args);
        switch (argv[0]) {
            case "tokens": t.tokens(); break;
            case "stop": t.stop(); break;
            case "errors": t.errors(); break;
            case "leak": t.leak(); break;
            default: throw new IllegalArgumentException("unknown case " + argv[0]);
        }
        System.out.println(t.passed + " passed, 0 failed");  // a failed check has thrown already
    }

    // ---- greedy tokens, streamed text, stats ---------------------------------------------------
    private void tokens() {
        try (KvqSession s = new KvqSession(bundle, kernels, 1)) {
            check(s.manifestJson().contains("\"kvexport-bundle\""), "manifestJson is the bundle's manifest");
            String summary = s.summary();
            check(summary.contains("policy: rule @ 4 bits/value") && summary.contains("context: 96 tokens"), "summary: " + summary.replace('\n', '|'));

            StringBuilder streamed = new StringBuilder();
            List<Integer> seen = new ArrayList<>();
            int[] out = s.generate(prompt, maxNew, 0f, 0, (id, piece) -> {
                if (id >= 0) seen.add(id);
                streamed.append(piece);
                return true;
            });
            check(Arrays.equals(out, expect), "greedy tokens equal PteDecoder's: " + Arrays.toString(out));
            check(seen.size() == out.length, "the listener saw every token");
            check(streamed.toString().equals(s.decode(out)), "streamed text equals decode(tokens)");

            KvqStats st = s.stats();
            check(st.promptTokens == prompt.length && st.generated == out.length, "stats count prompt and generated tokens");
            check(st.contextUsed == prompt.length + out.length - 1 && st.contextMax == 96, "context used/max: " + st.contextUsed + "/" + st.contextMax);
            check(st.prefillTokPerS > 0 && (out.length < 2 || st.decodeTokPerS > 0), "tok/s measured: " + st);
            check(st.kvBytesTotal() > 0 && st.kvBytesTotal() <= st.kvBytesAllocated, "KV bytes by width within the allocation");
            check(st.stopped.equals(out.length < maxNew ? "eos" : "max_new_tokens"), "stop reason " + st.stopped);

            if (args.containsKey("text")) {
                check(Arrays.equals(s.encode(args.get("text")), ids(args.get("text-ids"))), "encode matches HF tokenizers");
                int[] chat = s.encode(KvqSession.chatPrompt("", args.get("text")));
                check(chat.length > ids(args.get("text-ids")).length, "chat prompt carries the template tokens");
                check(s.generate(args.get("text"), 3, 0.8f, 7, null).length >= 1, "text prompt with sampling runs");
            }
        }
    }

    // ---- stop from the listener, then the session is still usable -------------------------------
    private void stop() {
        try (KvqSession s = new KvqSession(bundle, kernels, 1)) {
            int[] n = {0};
            int[] out = s.generate(prompt, maxNew, 0f, 0, (id, piece) -> id < 0 || ++n[0] < 3);
            check(Arrays.equals(out, Arrays.copyOf(expect, 3)), "stopped after 3 tokens: " + Arrays.toString(out));
            KvqStats st = s.stats();
            check(st.stopped.equals("listener") && st.generated == 3 && st.contextUsed == prompt.length + 2, "stats after stop: " + st);
            check(Arrays.equals(s.generate(prompt, maxNew, 0f, 0, null), expect), "a full run after the stop restarts cleanly");
            RuntimeException boom = new RuntimeException("listener failed");
            try {
                s.generate(prompt, maxNew, 0f, 0, (id, piece) -> { throw boom; });
                check(false, "a throwing listener must fail the run");
            } catch (RuntimeException e) {
                check(e == boom, "the listener's own exception reaches the caller");
            }
            check(Arrays.equals(s.generate(prompt, maxNew, 0f, 0, null), expect), "usable after a throwing listener");
        }
    }

    // ---- errors are Java exceptions with the runner's message -----------------------------------
    private void errors() throws IOException {
        expectError(() -> new KvqSession(bundle + "/nope", kernels, 0), "does not exist");
        expectError(() -> new KvqSession(bundle, bundle + "/libkvq_executorch.so", 0), "cannot load the kvq kernel library");
        Path corrupt = Files.createTempDirectory("kvq-corrupt-");
        try {
            for (String f : new String[] {"manifest.json", "tokenizer.json"}) Files.copy(Paths.get(bundle, f), corrupt.resolve(f));
            try (RandomAccessFile f = new RandomAccessFile(corrupt.resolve("model.pte").toFile(), "rw")) {
                f.setLength(Files.size(Paths.get(bundle, "model.pte")));  // zeros of the right size: passes the size check
            }
            expectError(() -> new KvqSession(corrupt.toString(), kernels, 0), "corrupt");
            Files.delete(corrupt.resolve("tokenizer.json"));
            expectError(() -> new KvqSession(corrupt.toString(), kernels, 0), "tokenizer.json is missing");
        } finally {
            for (String f : new String[] {"manifest.json", "tokenizer.json", "model.pte"}) Files.deleteIfExists(corrupt.resolve(f));
            Files.delete(corrupt);
        }
        KvqSession s = new KvqSession(bundle, kernels, 0);
        int[] long90 = new int[90];
        Arrays.fill(long90, 17);
        expectError(() -> s.generate(long90, 10, 0f, 0, null), "exceeds the program's max context of 96");
        expectError(() -> s.generate(new int[] {1, 49152}, 2, 0f, 0, null), "outside the vocabulary");
        expectError(() -> s.generate(new int[0], 2, 0f, 0, null), "the prompt is empty");
        expectError(() -> s.generate(prompt, 2, -1f, 0, null), "temperature");
        check(Arrays.equals(s.generate(prompt, maxNew, 0f, 0, null), expect), "usable after the errors");
        s.close();
        s.close();
        try {
            s.stats();
            check(false, "a closed session must refuse calls");
        } catch (IllegalStateException e) {
            check(true, "a closed session throws IllegalStateException");
        }
    }

    // ---- 100 open/generate/close cycles: RSS stays flat -----------------------------------------
    private void leak() throws IOException {
        int cycles = Integer.parseInt(args.getOrDefault("cycles", "100"));
        for (int i = 0; i < 10; i++) cycle();  // warm-up: allocator arenas, XNNPACK caches, JIT
        System.gc();  // both readings after a collection: the Java heap is not what is measured
        long warm = rssKiB();
        StringBuilder trace = new StringBuilder();
        for (int i = 1; i <= cycles; i++) {
            cycle();
            if (i % 20 == 0) trace.append(' ').append(rssKiB());
        }
        System.gc();
        long end = rssKiB();
        long bound = Long.parseLong(args.getOrDefault("bound-kib", "16384"));
        System.out.println("rss_kib warm=" + warm + " end=" + end + " growth=" + (end - warm) + " bound=" + bound + " cycles=" + cycles
                + " every20=" + trace.toString().trim());
        check(end - warm <= bound, "RSS growth over " + cycles + " cycles " + (end - warm) + " KiB <= " + bound + " KiB");
    }

    private void cycle() {
        try (KvqSession s = new KvqSession(bundle, kernels, 1)) {
            int[] out = s.generate(prompt, maxNew, 0f, 0, (id, piece) -> true);
            if (!Arrays.equals(out, expect)) throw new AssertionError("tokens changed across cycles: " + Arrays.toString(out));
            s.stats();
            s.summary();
        }
    }

    static long rssKiB() throws IOException {
        for (String line : Files.readAllLines(Paths.get("/proc/self/status")))
            if (line.startsWith("VmRSS:")) return Long.parseLong(line.replaceAll("[^0-9]", ""));
        throw new IOException("no VmRSS in /proc/self/status");
    }

    // ---- helpers -----------------------------------------------------------------------------
    private interface Call {
        void run();
    }

    private void expectError(Call call, String fragment) {
        try {
            call.run();
        } catch (KvqException e) {
            check(e.getMessage().contains(fragment), "error names '" + fragment + "': " + e.getMessage());
            return;
        }
        check(false, "expected a KvqException containing '" + fragment + "'");
    }

    private void check(boolean ok, String what) {
        if (!ok) throw new AssertionError("FAILED: " + what);
        passed++;
        System.out.println("ok: " + what);
    }

    private String need(String key) {
        String v = args.get(key);
        if (v == null) throw new IllegalArgumentException("missing --" + key);
        return v;
    }

    private static int[] ids(String csv) {
        return csv.isEmpty() ? new int[0] : Arrays.stream(csv.split(",")).mapToInt(Integer::parseInt).toArray();
    }
}
