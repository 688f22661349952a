plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

// README.md step 2 / 3: the ExecuTorch install for arm64-v8a and nlohmann/json's include folder.
fun pathProperty(name: String): String =
    rootProject.file(providers.gradleProperty(name).get()).absolutePath

android {
    namespace = "dev.kvexport.demo"
    compileSdk = 35
    ndkVersion = "27.2.12479018"

    defaultConfig {
        applicationId = "dev.kvexport.demo"  // export/android.py pushes to /sdcard/Android/data/<this>/files/bundles
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += "arm64-v8a" }
        externalNativeBuild {
            cmake {
                // One libkvq_jni.so holds the bridge, the runner, the kvq kernels and static ExecuTorch.
                arguments += listOf(
                    "-DANDROID_STL=c++_static",
                    "-DCMAKE_PREFIX_PATH=${pathProperty("kvq.executorchDir")}",
                    "-DKVQ_JSON_INCLUDE_DIR=${pathProperty("kvq.jsonIncludeDir")}",
                )
                targets += "kvq_jni"
            }
        }
    }

    externalNativeBuild {
        cmake {
            path = file("src/main/cpp/CMakeLists.txt")
            version = "3.30.5"
        }
    }

    // The Java API (KvqSession & co.) lives in src/main/java, shared with the host JVM test.
    sourceSets["main"].java.srcDirs("src/main/java", "src/main/kotlin")

    buildTypes {
        release {
            isMinifyEnabled = false  // JNI looks classes up by name: no renaming
            signingConfig = signingConfigs.getByName("debug")  // a demo: installable without a keystore
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}
