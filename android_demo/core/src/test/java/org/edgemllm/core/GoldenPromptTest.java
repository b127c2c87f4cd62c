package org.edgemllm.core;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.junit.Test;

/** Java renders the prompts edge-mllm's Python side renders, from the bundles' prompt_template. */
public class GoldenPromptTest {
    @Test
    @SuppressWarnings("unchecked")
    public void everyGoldenPromptMatchesPython() throws Exception {
        Path dir = Golden.dir("edgemllm.golden");
        List<Object> cases = (List<Object>) Golden.json(dir.resolve("prompts.json"));
        assertTrue("no golden prompts", cases.size() >= 4);
        for (Object item : cases) {
            Map<String, Object> c = (Map<String, Object>) item;
            PromptTemplate template = PromptTemplate.fromManifest((Map<String, Object>) c.get("prompt_template"));
            String question = (String) c.get("question");
            int images = ((Long) c.get("images")).intValue();
            assertEquals(c.get("text"), template.render(question, images));
            List<String> segments = new ArrayList<>();
            for (PromptTemplate.Segment s : template.segments(question, images)) {
                segments.add(s.toString());
            }
            assertEquals(c.get("segments"), segments);
        }
    }
}
