"""Reading prompt sets (jsonl, OpenAI batch, parquet, csv, txt) into records."""
