//! Chat templates: the Jinja template a model ships (in `tokenizer_config.json` or the GGUF key
//! `tokenizer.chat_template`) turns OpenAI-style messages into the prompt text the model was
//! trained on. Rendered with minijinja, the Jinja engine in Rust that Hugging Face's own
//! text-generation-inference uses for the same job.

use serde::Serialize;

/// ChatML, the convention of SmolLM2 and Qwen2, for models that ship no template (the
/// synthetic ones). Written for this project; real models use their own.
pub const CHATML: &str = r"{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Why a template could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse.
    #[error("chat template does not parse: {0}")]
    Parse(String),
    /// Rendering failed, or the template raised an error for these messages.
    #[error("chat template refused the messages: {0}")]
    Render(String),
}

/// A parsed chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Parses `source`; `bos`/`eos` are the token texts templates may refer to as `bos_token`
    /// and `eos_token`.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, ChatError> {
        let mut env = minijinja::Environment::new();
        // Hugging Face templates call raise_exception(...) to refuse message lists.
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ChatError::Parse(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos: bos.into(),
            eos: eos.into(),
        })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Message]) -> Result<String, ChatError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| ChatError::Parse(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| ChatError::Render(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_turns_and_opens_the_assistant() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let out = t
            .render(&[
                Message {
                    role: "system".into(),
                    content: "Be brief.".into(),
                },
                Message {
                    role: "user".into(),
                    content: "Hi".into(),
                },
            ])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let strict = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}",
            "",
            "",
        )
        .unwrap();
        let e = strict
            .render(&[Message {
                role: "assistant".into(),
                content: "x".into(),
            }])
            .unwrap_err()
            .to_string();
        assert!(e.contains("first must be user"), "{e}");
    }
}
