package org.edgemllm.core;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;

import java.util.List;
import org.junit.Test;

public class PromptTemplateTest {
    private final PromptTemplate chatml = new PromptTemplate("<|im_start|>user\n", "<image>\n", "<|im_end|>\n<|im_start|>assistant\n");

    @Test
    public void imagesGoBeforeTheQuestion() throws Exception {
        assertEquals("<|im_start|>user\n<image>\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n", chatml.render("What?", 2));
        assertEquals("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", chatml.render("Hi", 0));
    }

    @Test
    public void segmentsAlternateTextAndImages() throws Exception {
        List<PromptTemplate.Segment> s = chatml.segments("What?", 2);
        assertEquals(5, s.size());
        assertEquals("<|im_start|>user\n", s.get(0).text);
        assertEquals(true, s.get(1).isImage() && s.get(3).isImage());
        assertEquals("\n", s.get(2).text);
        assertEquals("\nWhat?<|im_end|>\n<|im_start|>assistant\n", s.get(4).text);
        // a template that opens with the image has no empty text segment
        PromptTemplate bare = new PromptTemplate("", "<image>", "");
        assertEquals(true, bare.segments("Q", 1).get(0).isImage());
    }

    @Test
    public void questionMayNotPlaceImages() {
        assertThrows(BundleException.class, () -> chatml.render("look <image> here", 1));
    }
}
