"""`triattn chat`: check the flags, find the conversation to resume, and run the app."""

from __future__ import annotations

from ..errors import UserError
from .config import DEFAULT_BUDGET, ChatConfig


def prepare(model, resume, system, no_compress, budget, store_factory=None, **options):
    """(config, store, conversation or None) from the flags; UserError (one line, exit 2) on bad input, before
    any model is loaded. Unset flags of a resumed conversation come from it: model, budget, system prompt."""
    from ..backends import choose_backend
    from .session import check_model
    from .store import ChatStore

    choose_backend(options["backend"])
    store_factory = store_factory or ChatStore
    conversation = None
    if resume:
        store = store_factory()
        conversation = store.latest()
        if conversation is None:
            store.close()
            raise UserError(f"no conversation to resume in {store.path}")
    model = model or (conversation.model if conversation else "demo")
    check_model(model, options["backend"])
    if no_compress:
        budget = None
    elif budget is None:
        budget = conversation.settings.get("budget", DEFAULT_BUDGET) if conversation else DEFAULT_BUDGET
    if conversation is not None:
        system = conversation.system if system is None else system
        conversation.system, conversation.model = system, model
    config = ChatConfig(model=model, budget=budget, system=system, **options)
    return config, (store if resume else store_factory()), conversation


def run_chat(model, resume, system, no_compress, budget, **options) -> None:
    import importlib.util

    if importlib.util.find_spec("textual") is None:
        raise UserError("the chat needs the tui extra: pip install 'triattn-local[tui]'")
    config, store, conversation = prepare(model, resume, system, no_compress, budget, **options)
    from .app import ChatApp

    app = ChatApp(config, store, conversation)
    try:
        app.run()
    finally:
        store.close()
    if app.unsaved:  # the store refused them to the end: say so rather than lose them silently
        raise UserError(f"{len(app.unsaved)} message(s) of this conversation could not be saved to {store.path}")
