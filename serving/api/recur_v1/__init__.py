"""recur.v1 over gRPC (protos/recur/v1/recur.proto): LanguageModel, Tagger, Classifier and
Models, each a thin servicer over the engine; convert.py translates the messages."""
