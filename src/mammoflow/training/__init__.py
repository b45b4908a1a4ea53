"""The train stage: a study's inputs, the fold trainer and the stage that runs them."""
