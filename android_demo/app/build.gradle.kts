plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.edgemllm.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.edgemllm.demo"
        minSdk = 28
        targetSdk = 35
        versionCode = 1
        versionName = "0.1"
        ndk { abiFilters += "arm64-v8a" }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    buildFeatures {
        viewBinding = true
    }
}

dependencies {
    implementation(project(":core"))
    // ExecuTorch's Android library: XNNPACK CPU kernels and the multimodal LlmModule.
    // Vulkan / QNN bundles need "executorch-android-vulkan" / "executorch-android-qnn" instead.
    implementation("org.pytorch:executorch-android:1.1.0")
    implementation("com.facebook.fbjni:fbjni:0.5.1")
    implementation("com.facebook.soloader:soloader:0.10.5")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.activity:activity-ktx:1.9.3")
    implementation("androidx.core:core-ktx:1.15.0")
    implementation("com.google.android.material:material:1.12.0")
}
