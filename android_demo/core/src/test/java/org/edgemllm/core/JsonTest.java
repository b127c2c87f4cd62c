package org.edgemllm.core;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertThrows;

import java.util.Arrays;
import java.util.List;
import java.util.Map;
import org.junit.Test;

public class JsonTest {
    @Test
    @SuppressWarnings("unchecked")
    public void parsesEveryKindOfValue() throws Exception {
        Map<String, Object> m = (Map<String, Object>) Json.parse(
                " {\"a\": [1, -2.5e1, true, false, null], \"s\": \"x\\\"\\n\\u00e9\\/\", \"o\": {}, \"e\": []} ");
        assertEquals(Arrays.asList(1L, -25.0, true, false, null), m.get("a"));
        assertEquals("x\"\n\u00e9/", m.get("s"));
        assertEquals(0, ((Map<?, ?>) m.get("o")).size());
        assertEquals(0, ((List<?>) m.get("e")).size());
        assertNull(Json.parse("null"));
    }

    @Test
    public void rejectsBrokenDocumentsWithThePosition() {
        for (String bad : new String[] {"", "{", "{\"a\" 1}", "[1,]", "{\"a\": tru}", "\"abc", "1 2", "{\"a\": 01x}"}) {
            String message = assertThrows(bad, BundleException.class, () -> Json.parse(bad)).getMessage();
            assertEquals(bad, true, message.startsWith("invalid JSON at character "));
        }
    }
}
