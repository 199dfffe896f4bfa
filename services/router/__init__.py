"""The router: MoE² gating and budgeted expert selection behind the OpenAI API."""
