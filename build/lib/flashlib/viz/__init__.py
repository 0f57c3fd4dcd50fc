"""Layer 7: figures and animations drawn from flashlib's algorithms. Import the submodule you need
(`flashlib.viz.stepthrough`, `flashlib.viz.hardware`, ...): this package imports nothing heavy itself."""
