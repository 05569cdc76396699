"""`triattn chat`: a terminal chat (Textual) that shows what the KV cache keeps.

main.run_chat checks the flags and starts app.ChatApp; session.ChatSession drives any backend's Engine; stream.relay
turns its events into batched UI messages; the widgets live in messages, kv_panel, heatmap, status_bar, chat_input.
"""
