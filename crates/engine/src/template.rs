//! Chat templates: the Jinja template stored in a GGUF's
//! `tokenizer.chat_template`, rendered with minijinja (llama.cpp's built-in
//! renderer is not Jinja and drops SmolLM2's default system prompt).

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;
use sluice_proto::miner::PromptMessage;

/// ChatML, for models whose GGUF carries no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

#[derive(Serialize)]
struct Ctx<'a> {
    messages: &'a [PromptMessage],
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>, bos_token: &str, eos_token: &str) -> Self {
        ChatTemplate {
            source: source.into(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        }
    }

    /// Renders the conversation with the generation prompt appended.
    pub fn render(&self, messages: &[PromptMessage]) -> Result<String, String> {
        let mut env = Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        let tmpl = env
            .template_from_str(&self.source)
            .map_err(|e| format!("chat template does not parse: {e}"))?;
        tmpl.render(Ctx {
            messages,
            add_generation_prompt: true,
            bos_token: &self.bos_token,
            eos_token: &self.eos_token,
        })
        .map_err(|e| format!("chat template failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The template shipped in SmolLM2-135M-Instruct's GGUF.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> PromptMessage {
        PromptMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn smollm2_keeps_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, "", "<|im_end|>");
        let out = t.render(&[msg("user", "Hi")]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")])
            .unwrap();
        assert!(out.starts_with("<|im_start|>system\nBe brief.<|im_end|>"));
    }

    #[test]
    fn chatml_fallback_and_raise_exception() {
        let t = ChatTemplate::new(CHATML, "", "");
        assert!(t
            .render(&[msg("user", "x")])
            .unwrap()
            .ends_with("assistant\n"));
        let bad = ChatTemplate::new("{{ raise_exception('no system') }}", "", "");
        assert!(bad.render(&[]).unwrap_err().contains("no system"));
    }
}
