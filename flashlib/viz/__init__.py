"""Layer 7: figures and animations drawn from flashlib's algorithms. Import the submodule you need
(`flashlib.viz.stepthrough`, `flashlib.viz.hardware`, ...): this package imports nothing heavy itself.
Step-throughs: stepthrough (FA1, FA2, backward, side by side), softmax_anim, matmul_tiles, waves; live
notebook widgets with static fallbacks: explorers."""
