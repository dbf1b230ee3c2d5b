"""What every package shares (imported by shards, avatars, cluster and jobs alike)."""
