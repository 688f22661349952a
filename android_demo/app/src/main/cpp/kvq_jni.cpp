// JNI surface of dev.kvexport.KvqNative: type conversion and exception translation only; the
// work is kvq_session.cpp and the runner library. Every entry point catches everything: a C++
// exception reaching the JVM would abort the app, so it becomes a dev.kvexport.KvqException.
#include <jni.h>

#include <cstdint>
#include <string>
#include <vector>

#include "error.h"
#include "kvq_session.h"
#include "utf8.h"

namespace {

using kvq::jni::Session;

// A Java exception is already pending (thrown by the listener): unwind and let the JVM see it.
struct JavaPending {};

// Java strings cross as UTF-16: JNI's *StringUTF* calls speak "modified UTF-8", which breaks on
// characters outside the BMP (emoji in generated text) and CheckJNI aborts on them.
std::string from_java(JNIEnv* env, jstring s) {
  if (s == nullptr) return {};
  const jsize n = env->GetStringLength(s);
  std::vector<jchar> units(n);
  env->GetStringRegion(s, 0, n, units.data());
  std::string out;
  for (jsize i = 0; i < n; ++i) {
    uint32_t cp = units[i];
    if (cp >= 0xD800 && cp <= 0xDBFF && i + 1 < n && units[i + 1] >= 0xDC00 && units[i + 1] <= 0xDFFF)
      cp = 0x10000 + ((cp - 0xD800) << 10) + (units[++i] - 0xDC00);
    else if (cp >= 0xD800 && cp <= 0xDFFF)
      cp = 0xFFFD;  // a lone surrogate
    kvq::runner::utf8::append(out, cp);
  }
  return out;
}

jstring to_java(JNIEnv* env, const std::string& s) {
  const std::string valid = kvq::runner::utf8::lossy(s);
  std::vector<jchar> units;
  units.reserve(valid.size());
  for (size_t i = 0; i < valid.size();) {
    uint32_t cp = 0;
    i += kvq::runner::utf8::valid_length(valid, i, &cp);
    if (cp >= 0x10000) {
      units.push_back(static_cast<jchar>(0xD800 + ((cp - 0x10000) >> 10)));
      units.push_back(static_cast<jchar>(0xDC00 + ((cp - 0x10000) & 0x3FF)));
    } else {
      units.push_back(static_cast<jchar>(cp));
    }
  }
  return env->NewString(units.data(), static_cast<jsize>(units.size()));
}

void throw_java(JNIEnv* env, const char* cls, const std::string& message) {
  if (env->ExceptionCheck()) return;
  jclass c = env->FindClass(cls);
  if (c == nullptr) return;  // FindClass left NoClassDefFoundError pending
  jstring msg = to_java(env, message);
  jmethodID ctor = env->GetMethodID(c, "<init>", "(Ljava/lang/String;)V");
  if (msg != nullptr && ctor != nullptr) env->Throw(static_cast<jthrowable>(env->NewObject(c, ctor, msg)));
}

// Runs body, mapping every C++ exception to a Java one; returns fallback when one is thrown.
template <class T, class Body>
T guarded(JNIEnv* env, T fallback, Body body) {
  try {
    return body();
  } catch (const JavaPending&) {
  } catch (const kvq::runner::RunnerError& e) {
    throw_java(env, "dev/kvexport/KvqException", e.what());
  } catch (const std::bad_alloc&) {
    throw_java(env, "dev/kvexport/KvqException", "out of memory in the native runner (the bundle may be too large for this device)");
  } catch (const std::exception& e) {  // JSON, filesystem, ... inside the library
    throw_java(env, "dev/kvexport/KvqException", std::string("native runner error: ") + e.what());
  } catch (...) {
    throw_java(env, "dev/kvexport/KvqException", "unknown native runner error");
  }
  return fallback;
}

Session& session(jlong handle) {
  if (handle == 0) throw kvq::runner::RunnerError("the session is closed: open the bundle again");
  return *reinterpret_cast<Session*>(handle);
}

std::vector<int64_t> from_java(JNIEnv* env, jintArray a) {
  if (a == nullptr) return {};
  const jsize n = env->GetArrayLength(a);
  std::vector<jint> v(n);
  env->GetIntArrayRegion(a, 0, n, v.data());
  return std::vector<int64_t>(v.begin(), v.end());
}

jintArray to_java(JNIEnv* env, const std::vector<int64_t>& ids) {
  std::vector<jint> v(ids.begin(), ids.end());
  jintArray a = env->NewIntArray(static_cast<jsize>(v.size()));
  if (a == nullptr) throw JavaPending{};  // OutOfMemoryError pending
  env->SetIntArrayRegion(a, 0, static_cast<jsize>(v.size()), v.data());
  return a;
}

}  // namespace

extern "C" {

JNIEXPORT jlong JNICALL Java_dev_kvexport_KvqNative_open(JNIEnv* env, jclass, jstring bundle_dir, jstring kernels_path, jint threads) {
  return guarded<jlong>(env, 0, [&] {
    return reinterpret_cast<jlong>(new Session(from_java(env, bundle_dir), from_java(env, kernels_path), threads));
  });
}

JNIEXPORT void JNICALL Java_dev_kvexport_KvqNative_close(JNIEnv* env, jclass, jlong handle) {
  guarded<int>(env, 0, [&] {
    delete reinterpret_cast<Session*>(handle);  // 0 is a no-op: close is idempotent on the Java side
    return 0;
  });
}

JNIEXPORT jstring JNICALL Java_dev_kvexport_KvqNative_manifestJson(JNIEnv* env, jclass, jlong handle) {
  return guarded<jstring>(env, nullptr, [&] { return to_java(env, session(handle).manifest_json()); });
}

JNIEXPORT jstring JNICALL Java_dev_kvexport_KvqNative_summary(JNIEnv* env, jclass, jlong handle) {
  return guarded<jstring>(env, nullptr, [&] { return to_java(env, session(handle).summary()); });
}

JNIEXPORT jintArray JNICALL Java_dev_kvexport_KvqNative_encode(JNIEnv* env, jclass, jlong handle, jstring text) {
  return guarded<jintArray>(env, nullptr, [&] { return to_java(env, session(handle).encode(from_java(env, text))); });
}

JNIEXPORT jstring JNICALL Java_dev_kvexport_KvqNative_decode(JNIEnv* env, jclass, jlong handle, jintArray ids) {
  return guarded<jstring>(env, nullptr, [&] { return to_java(env, session(handle).decode(from_java(env, ids))); });
}

JNIEXPORT jintArray JNICALL Java_dev_kvexport_KvqNative_generate(JNIEnv* env, jclass, jlong handle, jintArray prompt, jint max_new_tokens,
                                                                 jfloat temperature, jlong seed, jobject listener) {
  return guarded<jintArray>(env, nullptr, [&] {
    Session& s = session(handle);
    kvq::jni::TokenListener call;
    if (listener != nullptr) {
      jclass cls = env->GetObjectClass(listener);
      jmethodID on_token = env->GetMethodID(cls, "onToken", "(ILjava/lang/String;)Z");
      env->DeleteLocalRef(cls);
      if (on_token == nullptr) throw JavaPending{};  // NoSuchMethodError pending
      call = [env, listener, on_token](int64_t id, const std::string& piece) {  // outlives this block: by value
        jstring text = to_java(env, piece);
        if (text == nullptr) throw JavaPending{};
        const jboolean keep = env->CallBooleanMethod(listener, on_token, static_cast<jint>(id), text);
        env->DeleteLocalRef(text);  // one local ref per token would overflow the table on a long reply
        if (env->ExceptionCheck()) throw JavaPending{};
        return keep == JNI_TRUE;
      };
    }
    return to_java(env, s.generate(from_java(env, prompt), max_new_tokens, temperature, static_cast<uint64_t>(seed), call));
  });
}

// Layout shared with KvqStats.fromNative: prompt, generated, context used, context max, prefill
// tok/s, decode tok/s, first token ms, KV bytes at 2/4/8/16 bits, KV bytes allocated, stop code.
JNIEXPORT jdoubleArray JNICALL Java_dev_kvexport_KvqNative_stats(JNIEnv* env, jclass, jlong handle) {
  return guarded<jdoubleArray>(env, nullptr, [&] {
    const kvq::jni::SessionStats& st = session(handle).stats();
    const auto kv = [&](int bits) { auto it = st.kv_bytes_by_bits.find(bits); return it == st.kv_bytes_by_bits.end() ? 0.0 : double(it->second); };
    const double stop = st.stopped == "eos" ? 1 : st.stopped == "max_new_tokens" ? 2 : st.stopped == "listener" ? 3 : 0;
    const double v[] = {double(st.prompt_tokens), double(st.generated), double(st.context_used), double(st.context_max),
                        st.prefill_tok_s, st.decode_tok_s, st.first_token_ms, kv(2), kv(4), kv(8), kv(16),
                        double(st.kv_bytes_allocated), stop};
    jdoubleArray a = env->NewDoubleArray(sizeof v / sizeof v[0]);
    if (a == nullptr) throw JavaPending{};
    env->SetDoubleArrayRegion(a, 0, sizeof v / sizeof v[0], v);
    return a;
  });
}

}  // extern "C"
