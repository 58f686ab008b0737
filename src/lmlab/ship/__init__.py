"""Shipping a trained model: GGUF files for llama.cpp (`gguf`), Hugging Face model cards (`card`) and uploads
to the Hub (`push`). Each module is imported on demand; nothing here touches the network at import."""
