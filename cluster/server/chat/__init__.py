"""DeepSeek-V4 chat: the prompt encoding (encoding.py), request fields (request.py), the output parser for
reasoning and tool calls (parser.py) and the OpenAI response shapes (response.py)."""
