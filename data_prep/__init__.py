"""ted-prep: raw text → packed token shards in the Megatron indexed format."""
