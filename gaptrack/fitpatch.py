"""Adding a callback to every ``keras.Model.fit`` call, beside MLflow's autolog.

``mlflow.keras.autolog()`` and ``mlflow.tensorflow.autolog()`` patch
``keras.Model.fit`` too (``mlflow/utils/autologging_utils/safety.py``,
``safe_patch``). MLflow's patching does not stack: it keeps one original per
function (``gorilla``'s stored original), a second ``safe_patch`` of the same
function replaces the first, and ``autolog(disable=True)`` puts the stored
original back, or deletes the attribute, whatever was patched on top since.
So gaptrack does not use ``safe_patch`` (its patch would replace MLflow's, or be
replaced by it); :class:`FitPatch` composes with it in either order:

- the wrapper is installed on the backend's trainer class (the class in
  ``keras.Model``'s MRO that defines ``fit``, where MLflow's patch on
  ``keras.Model`` finds it): MLflow enabled later wraps it, and MLflow
  disabled (its attribute reverted or deleted) leaves it in place;
- when a patch is already on ``keras.Model`` (MLflow enabled first), a second
  wrapper goes on top of it, so that MLflow's patch sees the arguments as
  gaptrack passes them; if MLflow is disabled, the first wrapper still tracks;
- a wrapper passes ``fit``'s arguments on by keyword (``self`` alone
  positionally), with a new callbacks list: MLflow's Keras autolog appends to
  the list it is given and reads ``callbacks`` positionally as ``args[5]`` only,
  and given positional ``callbacks`` it passes them twice (``got multiple values
  for argument 'callbacks'``); a wrapper under it takes such a repeat as one;
- a third wrapper goes on the model classes users build directly
  (``keras.Sequential`` and the functional ``keras.Model(inputs, outputs)``),
  which inherit ``fit``: found before ``keras.Model``'s attribute, it runs
  before any patch there, so MLflow's autolog enabled *after* gaptrack's still
  gets ``fit``'s arguments by keyword and a list of callbacks (called directly
  with ``callbacks=None`` or a tuple, MLflow's Keras patch fails on its own:
  ``'NoneType' object is not iterable``, its run ``FAILED``); it calls
  ``keras.Model.fit`` as it is at call time, whatever is patched there. A
  subclassed model (``class M(keras.Model)``) is reached by the two others only;
- a disabled wrapper still in a chain (another patch holds it) passes calls on
  untouched, as MLflow's do: disabling never unpatches someone else's patch.

The user's callbacks (a list, a tuple or ``None``) are never modified.
"""

import functools
import inspect


class FitPatch:
    """Adds ``callback_for(arguments)`` to the callbacks of every ``fit`` of ``model_class``.

    Args:
        model_class: ``keras.Model`` (or another Keras' ``Model``: one that
            defines ``fit`` itself is wrapped on top only).
        front: subclasses of ``model_class`` that inherit ``fit``, to wrap
            ahead of any patch on it.
        callback_for: ``fn(arguments) -> callback or None``, with ``arguments``
            ``{name: value}`` of the ``fit`` call as bound to its signature
            (``self`` is the model); ``None`` adds nothing. It may raise, to
            refuse the call before training starts.

    Example:
        >>> patch = FitPatch(keras.Model, lambda arguments: MyCallback())
        >>> patch.enable()
        >>> patch.disable()
    """

    def __init__(self, model_class, callback_for, front=()):
        self.model_class = model_class
        self.callback_for = callback_for
        self.front = [c for c in front if "fit" not in vars(c)]
        self.enabled = False
        own = "fit" in vars(model_class) and "_gorilla_original_fit" not in vars(model_class)
        #: The class whose ``fit`` Keras runs (the backend's trainer), if not ``model_class``.
        self._trainer = None if own else next(
            (c for c in model_class.__mro__[1:] if "fit" in vars(c)), None)
        self._original = vars(self._trainer)["fit"] if self._trainer else None
        self._base = self._wrap(self._original) if self._trainer else None
        self._top = None
        self._front = self._wrap(self._dispatch()) if self.front else None

    def _dispatch(self):
        """``fit`` as ``model_class`` has it at call time (any patch on it included)."""
        model_class = self.model_class

        @functools.wraps(self._original or vars(model_class)["fit"])
        def fit(model, *args, **kwargs):
            return model_class.fit(model, *args, **kwargs)

        return fit

    def enable(self):
        """Add the callback from now on; again after :meth:`disable`."""
        self.enabled = True
        if self._trainer is not None:
            setattr(self._trainer, "fit", self._base)
        current = vars(self.model_class).get("fit")
        if current is not None and not self._holds(current):
            self._top = self._wrap(current)
            setattr(self.model_class, "fit", self._top)
        for cls in self.front:
            setattr(cls, "fit", self._front)

    def disable(self):
        """Stop adding it; the patches this one wrapped are put back."""
        self.enabled = False
        for cls in self.front:
            if vars(cls).get("fit") is self._front:
                delattr(cls, "fit")
        if self._top is not None and vars(self.model_class).get("fit") is self._top:
            setattr(self.model_class, "fit", self._top.__wrapped__)
        self._top = None
        if self._trainer is not None and vars(self._trainer).get("fit") is self._base:
            setattr(self._trainer, "fit", self._original)

    def _holds(self, function):
        """Whether ``function`` is one of this patch's wrappers or wraps one."""
        while function is not None:
            if function is self._base or function is self._top:
                return True
            function = getattr(function, "__wrapped__", None)
        return False

    def _wrap(self, inner):
        patch = self
        signature = inspect.signature(inner)
        positional = list(signature.parameters)[1:]

        @functools.wraps(inner)
        def fit(model, *args, **kwargs):
            if not patch.enabled:
                return inner(model, *args, **kwargs)
            # a keyword repeating a positional argument with the very same object
            # (MLflow's Keras autolog does, for callbacks) counts once
            kwargs = {k: v for k, v in kwargs.items()
                      if not (k in positional[:len(args)] and v is args[positional.index(k)])}
            arguments = dict(signature.bind(model, *args, **kwargs).arguments)
            callback = patch.callback_for(arguments)
            callbacks = arguments.get("callbacks")
            if callback is not None or callbacks is not None:
                arguments["callbacks"] = [*(callbacks or ()),
                                          *([] if callback is None else [callback])]
            del arguments[next(iter(signature.parameters))]
            return inner(model, **arguments)

        return fit
