"""Load a STAR-KV checkpoint with plain transformers and stream a chat reply.

python examples/generate.py SmolLM2-135M-Instruct-starkv-0.5 "What is the capital of France?"
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer


def main(folder: str, question: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(**inputs, max_new_tokens=64, do_sample=False, streamer=streamer)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France?")
