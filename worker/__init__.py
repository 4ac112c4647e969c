"""The GPU side of easel: one process per GPU, one family's pipelines loaded once and kept warm."""
