"""The OpenAI-compatible server: FastAPI routes (`app`), pydantic bodies (`protocol`), the decoding thread (`engine`)."""
