"""What a scoring run leaves on disk and how it is opened again: the artifact, tuned sizes,
imported official ACIP checkpoints."""
