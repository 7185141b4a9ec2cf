"""ChatGLM3's tokenizer: ChatGLM2's SentencePiece vocabulary plus four role tokens.

`<|system|> <|user|> <|assistant|> <|observation|>` follow the five ChatGLM2 specials (for the
real chatglm3-6b file: 64794..64797). They exist only as ids: typed in user text they encode as
plain pieces, so a user cannot open a turn of another role. The chat format that uses them is
model/chat_format.py.
"""

from __future__ import annotations

from chatglm_serve.model.tokenizer import SPECIAL_TOKENS, ChatGLMTokenizer

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


class ChatGLM3Tokenizer(ChatGLMTokenizer):
    special_token_names = SPECIAL_TOKENS + ROLE_TOKENS
    family = "chatglm3"

    def role_token_id(self, role: str) -> int:
        return self.special_tokens[f"<|{role}|>"]

    def encode_chat(self, query, history=None, reply_ids=None) -> list[int]:
        """The prompt ids of this tokenizer's chat format (ChatGLM3's, unless overridden)."""
        from chatglm_serve.model.family import chat_format_of

        return chat_format_of(self).encode_chat(query, history, reply_ids=reply_ids)

    def __repr__(self) -> str:
        return f"ChatGLM3Tokenizer({self.source!r}, vocab_size={self.vocab_size})"
