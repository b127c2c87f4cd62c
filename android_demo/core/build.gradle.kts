// Plain Java, no Android: everything that is not UI, unit-tested on any JDK (see README).
plugins {
    `java-library`
}

java {
    sourceCompatibility = JavaVersion.VERSION_11
    targetCompatibility = JavaVersion.VERSION_11
}

dependencies {
    testImplementation("junit:junit:4.13.2")
}

tasks.test {
    // The cross-language tests read golden files that edge-mllm's pytest suite writes; pass their
    // folders through (-Dedgemllm.golden=... -Dedgemllm.bundles=...), or those tests are skipped.
    listOf("edgemllm.golden", "edgemllm.bundles", "edgemllm.require").forEach { key ->
        System.getProperty(key)?.let { systemProperty(key, it) }
    }
}
