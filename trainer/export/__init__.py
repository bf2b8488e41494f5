"""Export: checkpoint -> clean adapter, adapter + base -> merged model, InternLM2 -> Llama layout, GGUF."""
