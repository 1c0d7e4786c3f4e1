"""Renderers: one ProbeSpec in, the text each mechanism needs out (C module, tracefs line, BPF C)."""
