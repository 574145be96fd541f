"""dartprune's native decode loop: its own forward over a preallocated KV cache (`model`), sampling and the
generation loop with streaming and stop strings (`generate`)."""
