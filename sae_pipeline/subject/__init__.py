"""The subject model: loading (Hub id or local folder) through TransformerBridge, the small offline
GPT-NeoX trained here, cross-entropy with a replaced activation, and steered generation."""
